{{/*
The pod template shared by the Deployment (shards: 1) and the StatefulSet (shards > 1). With
shards, each pod reads config-<ordinal>.yaml and its data volume comes from the StatefulSet's
volumeClaimTemplates.
*/}}
{{- define "pathwatch.podTemplate" -}}
{{- $config := include "pathwatch.configDict" . | fromJson -}}
{{- $sharded := eq (include "pathwatch.sharded" .) "true" -}}
{{- $scheme := ternary "HTTPS" "HTTP" (eq (include "pathwatch.httpTls" .) "true") -}}
{{- $probes := or .Values.startupProbe.enabled .Values.livenessProbe.enabled .Values.readinessProbe.enabled -}}
{{- if and (dig "http" "protect_probes" false $config) $probes -}}
{{- fail "config.http.protect_probes is true: the kubelet's probes cannot send a bearer token and would fail. Keep it false, or disable startupProbe, livenessProbe and readinessProbe." -}}
{{- end -}}
metadata:
  annotations:
    # Rolls the pod when the rendered config changes{{ if $sharded }} (any shard's: every shard rolls){{ end }}.
    {{- if $sharded }}
    checksum/config: {{ include "pathwatch.shardConfigsYaml" . | sha256sum }}
    {{- else }}
    checksum/config: {{ include "pathwatch.configYaml" . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "pathwatch.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "pathwatch.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  containers:
    - name: pathwatch
      image: {{ include "pathwatch.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      # The image's entrypoint is `pathwatch`.
      args:
        - serve
        - --config
        {{- if $sharded }}
        # This shard's file, config-<ordinal>.yaml (POD_INDEX below).
        - /etc/pathwatch/config-$(POD_INDEX).yaml
        {{- else }}
        - /etc/pathwatch/config.yaml
        {{- end }}
        - --shutdown-timeout
        - {{ max 1 (sub (int .Values.terminationGracePeriodSeconds) 10) | quote }}
      env:
        {{- if $sharded }}
        # The pod's ordinal in the StatefulSet, from the label apps.kubernetes.io/pod-index the
        # StatefulSet controller sets (Kubernetes 1.28+); it picks config-<ordinal>.yaml. Not a
        # PATHWATCH_* name: pathwatch takes those for settings.
        - name: POD_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        {{- end }}
        # The image sets PATHWATCH_DATA_DIR, and environment variables override the config
        # file: set it to the config's data_dir so the file stays the single source.
        - name: PATHWATCH_DATA_DIR
          value: {{ $config.data_dir | quote }}
        {{- range .Values.secretEnv }}
        - name: {{ .name }}
          valueFrom:
            secretKeyRef:
              name: {{ .secretName }}
              key: {{ .key }}
              {{- if hasKey . "optional" }}
              optional: {{ .optional }}
              {{- end }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ include "pathwatch.listenPort" $config.receiver.grpc.listen }}
          protocol: TCP
        {{- if $config.receiver.http.listen }}
        - name: otlp-http
          containerPort: {{ include "pathwatch.listenPort" $config.receiver.http.listen }}
          protocol: TCP
        {{- end }}
        - name: http
          containerPort: {{ include "pathwatch.listenPort" $config.http.listen }}
          protocol: TCP
      {{- if .Values.startupProbe.enabled }}
      startupProbe:
        httpGet:
          path: /healthz
          port: http
          scheme: {{ $scheme }}
        periodSeconds: {{ .Values.startupProbe.periodSeconds }}
        timeoutSeconds: {{ .Values.startupProbe.timeoutSeconds }}
        failureThreshold: {{ .Values.startupProbe.failureThreshold }}
      {{- end }}
      {{- if .Values.livenessProbe.enabled }}
      # /healthz answers while the process serves HTTP: a hung process gets restarted.
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
          scheme: {{ $scheme }}
        periodSeconds: {{ .Values.livenessProbe.periodSeconds }}
        timeoutSeconds: {{ .Values.livenessProbe.timeoutSeconds }}
        failureThreshold: {{ .Values.livenessProbe.failureThreshold }}
      {{- end }}
      {{- if .Values.readinessProbe.enabled }}
      # /readyz is 503 while the store is not open or writes fail, or the receiver or the
      {{- if $sharded }}
      # scheduler is down. The headless Service keeps publishing the shard (its clusters have
      # nowhere else to go): collectors queue and retry until it is ready.
      {{- else }}
      # scheduler is down: the Service stops routing OTLP here and collectors queue and retry.
      {{- end }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
          scheme: {{ $scheme }}
        periodSeconds: {{ .Values.readinessProbe.periodSeconds }}
        timeoutSeconds: {{ .Values.readinessProbe.timeoutSeconds }}
        failureThreshold: {{ .Values.readinessProbe.failureThreshold }}
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/pathwatch
          readOnly: true
        - name: data
          mountPath: /var/lib/pathwatch
        - name: tmp
          mountPath: /tmp
        {{- if eq (include "pathwatch.adminToken.enabled" .) "true" }}
        # The admin API's bearer token (http.auth.bearer_token_file), re-read on change.
        - name: api-token
          mountPath: {{ .Values.adminToken.mountPath }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "pathwatch.fullname" . }}
    {{- if and $sharded .Values.persistence.enabled }}
    {{- /* Each shard's "data" volume comes from the StatefulSet's volumeClaimTemplates. */}}
    {{- else }}
    - name: data
      {{- if .Values.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ .Values.persistence.existingClaim | default (include "pathwatch.fullname" .) }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    {{- if eq (include "pathwatch.adminToken.enabled" .) "true" }}
    - name: api-token
      secret:
        secretName: {{ include "pathwatch.adminToken.secretName" . }}
        items:
          - key: {{ include "pathwatch.adminToken.key" . }}
            path: {{ include "pathwatch.adminToken.key" . }}
        # Readable by the pod's fsGroup (10001) only.
        defaultMode: 0440
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
