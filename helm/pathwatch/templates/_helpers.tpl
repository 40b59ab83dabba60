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
{{- if eq (include "pathwatch.adminToken.enabled" .) "true" -}}
{{- $_ := set $config.http "auth" (dict "bearer_token_file" (include "pathwatch.adminToken.file" .)) -}}
{{- end -}}
{{- toJson $config -}}
{{- end }}

{{/*
"true" when the chart guards /api/ with its admin token: adminToken.enabled and the user's
config.http.auth names no token source of its own.
*/}}
{{- define "pathwatch.adminToken.enabled" -}}
{{- $auth := dig "http" "auth" dict (.Values.config | default dict) -}}
{{- if and .Values.adminToken.enabled (not (or $auth.bearer_token $auth.bearer_token_file $auth.bearer_token_env)) -}}true{{- end -}}
{{- end }}

{{/*
The Secret holding the admin token: adminToken.existingSecret, or the one the chart creates.
*/}}
{{- define "pathwatch.adminToken.secretName" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-api-token" (include "pathwatch.fullname" . | trunc 53 | trimSuffix "-")) -}}
{{- end }}

{{/*
The key of the token in that Secret ("token" in the Secret the chart creates).
*/}}
{{- define "pathwatch.adminToken.key" -}}
{{- if .Values.adminToken.existingSecret -}}{{ .Values.adminToken.existingSecretKey | default "token" }}{{- else -}}token{{- end -}}
{{- end }}

{{/*
The token file's path in the container (http.auth.bearer_token_file).
*/}}
{{- define "pathwatch.adminToken.file" -}}
{{- printf "%s/%s" (.Values.adminToken.mountPath | trimSuffix "/") (include "pathwatch.adminToken.key" .) -}}
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

{{/*
A NetworkPolicyPeer selecting pods by namespace name AND labels (both in one peer, so a pod
with the labels in another namespace does not match). Argument: dict "namespace" "labels".
Empty labels select every pod of the namespace.
*/}}
{{- define "pathwatch.networkPolicy.peer" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ .namespace | quote }}
  {{- if .labels }}
  podSelector:
    matchLabels:
      {{- toYaml .labels | nindent 6 }}
  {{- else }}
  podSelector: {}
  {{- end }}
{{- end }}

{{/*
Who may send OTLP: networkPolicy.ingress.grpcFrom, or the collectors' namespace and labels.
*/}}
{{- define "pathwatch.networkPolicy.otlpPeers" -}}
{{- $np := .Values.networkPolicy -}}
{{- if $np.ingress.grpcFrom -}}
{{- toYaml $np.ingress.grpcFrom -}}
{{- else -}}
{{- include "pathwatch.networkPolicy.peer" (dict "namespace" ($np.collectors.namespace | default .Release.Namespace) "labels" $np.collectors.podLabels) -}}
{{- end -}}
{{- end }}

{{/*
Who may reach the admin port: networkPolicy.ingress.httpFrom, or Prometheus and the operators'
namespace. Empty when none is configured (the port is then closed to every pod).
*/}}
{{- define "pathwatch.networkPolicy.adminPeers" -}}
{{- $np := .Values.networkPolicy -}}
{{- if $np.ingress.httpFrom -}}
{{- toYaml $np.ingress.httpFrom -}}
{{- else -}}
{{- if $np.prometheus.enabled }}
{{ include "pathwatch.networkPolicy.peer" (dict "namespace" $np.prometheus.namespace "labels" $np.prometheus.podLabels) }}
{{- end }}
{{- if $np.operators.namespace }}
{{ include "pathwatch.networkPolicy.peer" (dict "namespace" $np.operators.namespace "labels" $np.operators.podLabels) }}
{{- end }}
{{- end -}}
{{- end }}

{{/*
Human-readable summaries of the NetworkPolicy's peers, for NOTES.txt.
*/}}
{{- define "pathwatch.networkPolicy.otlpSummary" -}}
{{- $np := .Values.networkPolicy -}}
{{- if $np.ingress.grpcFrom -}}
the peers in networkPolicy.ingress.grpcFrom
{{- else -}}
{{ include "pathwatch.peerSummary" (dict "namespace" ($np.collectors.namespace | default .Release.Namespace) "labels" $np.collectors.podLabels) }}
{{- end -}}
{{- end }}

{{- define "pathwatch.networkPolicy.adminSummary" -}}
{{- $np := .Values.networkPolicy -}}
{{- if $np.ingress.httpFrom -}}
the peers in networkPolicy.ingress.httpFrom
{{- else -}}
{{- $peers := list -}}
{{- if $np.prometheus.enabled -}}
{{- $peers = append $peers (include "pathwatch.peerSummary" (dict "namespace" $np.prometheus.namespace "labels" $np.prometheus.podLabels)) -}}
{{- end -}}
{{- if $np.operators.namespace -}}
{{- $peers = append $peers (include "pathwatch.peerSummary" (dict "namespace" $np.operators.namespace "labels" $np.operators.podLabels)) -}}
{{- end -}}
{{- if $peers -}}{{ join " and " $peers }}{{- else -}}no pod{{- end -}}
{{- end -}}
{{- end }}

{{- define "pathwatch.peerSummary" -}}
{{- $pairs := list -}}
{{- range $k, $v := .labels -}}{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}{{- end -}}
{{- if $pairs -}}
pods labelled {{ join "," $pairs }} in namespace {{ .namespace }}
{{- else -}}
any pod in namespace {{ .namespace }}
{{- end -}}
{{- end }}
