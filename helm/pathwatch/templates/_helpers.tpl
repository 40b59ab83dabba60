{{/*
The chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "pathwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: the release name, suffixed with the chart name unless it already
contains it.
*/}}
{{- define "pathwatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pathwatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "pathwatch.labels" -}}
helm.sh/chart: {{ include "pathwatch.chart" . }}
{{ include "pathwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/component: detector
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the pod; never change them between releases (selectors are immutable).
*/}}
{{- define "pathwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pathwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pathwatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pathwatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pathwatch.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
pathwatch's configuration as a dict: .Values.config merged over the defaults the chart's
volumes and ports rely on. Lists (rules, sinks) in .Values.config replace, never append.
mergeOverwrite skips empty values, so an explicit receiver.http.listen "" (the OTLP/HTTP
receiver off) is put back after the merge.
*/}}
{{- define "pathwatch.configDict" -}}
{{- $user := .Values.config | default dict -}}
{{- $defaults := dict
  "data_dir" "/var/lib/pathwatch"
  "receiver" (dict "grpc" (dict "listen" "0.0.0.0:4317") "http" (dict "listen" "0.0.0.0:4318"))
  "http" (dict "listen" "0.0.0.0:8080")
-}}
{{- $config := mergeOverwrite $defaults (deepCopy $user) -}}
{{- $httpReceiver := dig "receiver" "http" dict $user -}}
{{- if and (hasKey $httpReceiver "listen") (not $httpReceiver.listen) -}}
{{- $_ := set $config.receiver.http "listen" "" -}}
{{- end -}}
{{- toJson $config -}}
{{- end }}

{{/*
"true" when the OTLP/HTTP receiver is on (config receiver.http.listen not empty), "" otherwise.
*/}}
{{- define "pathwatch.otlpHttp" -}}
{{- $config := include "pathwatch.configDict" . | fromJson -}}
{{- if $config.receiver.http.listen -}}true{{- end -}}
{{- end }}

{{/*
The config file's text; its sha256 is the pod's checksum/config annotation.
*/}}
{{- define "pathwatch.configYaml" -}}
{{- include "pathwatch.configDict" . | fromJson | toYaml }}
{{- end }}

{{/*
The port of a HOST:PORT listen address (the container ports follow the config).
*/}}
{{- define "pathwatch.listenPort" -}}
{{- splitList ":" . | last | int -}}
{{- end }}

{{/*
Label matchers that pick this release's series in the PrometheusRule expressions.
*/}}
{{- define "pathwatch.promSelector" -}}
{{- if .Values.prometheusRule.selector -}}
{{- .Values.prometheusRule.selector -}}
{{- else -}}
{{- printf "job=%q, namespace=%q" (include "pathwatch.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end }}

{{/*
"true" when the admin HTTP server serves TLS (config http.tls.cert_file), "" otherwise.
*/}}
{{- define "pathwatch.httpTls" -}}
{{- $config := include "pathwatch.configDict" . | fromJson -}}
{{- if dig "http" "tls" "cert_file" "" $config -}}true{{- end -}}
{{- end }}

{{/*
Names of the environment variables the config reads secrets from (sinks' secret_env and
token_env, the receivers' and the admin API's bearer_token_env), as "where=NAME" lines.
*/}}
{{- define "pathwatch.secretEnvRefs" -}}
{{- $config := include "pathwatch.configDict" . | fromJson -}}
{{- range $sink := ($config.sinks | default list) }}
{{- range $field := list "secret_env" "token_env" }}
{{- with (get $sink $field) }}
sink {{ $sink.name }} {{ $field }}={{ . }}
{{- end }}
{{- end }}
{{- end }}
{{- with (dig "receiver" "grpc" "auth" "bearer_token_env" "" $config) }}
receiver.grpc.auth bearer_token_env={{ . }}
{{- end }}
{{- with (dig "receiver" "http" "auth" "bearer_token_env" "" $config) }}
receiver.http.auth bearer_token_env={{ . }}
{{- end }}
{{- with (dig "http" "auth" "bearer_token_env" "" $config) }}
http.auth bearer_token_env={{ . }}
{{- end }}
{{- end }}
