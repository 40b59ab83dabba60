{{/*
Shards (values `shards` and `shardClusters`): with shards > 1 the chart renders a StatefulSet
of that many pods instead of the Deployment, each pod a shard owning the clusters
shardClusters assigns to its ordinal. See values.yaml.
*/}}

{{/*
The number of shards (1: today's single replica, a Deployment).
*/}}
{{- define "pathwatch.shards" -}}
{{- .Values.shards | default 1 | int -}}
{{- end }}

{{/*
"true" when pathwatch runs as shards (shards > 1), "" otherwise.
*/}}
{{- define "pathwatch.sharded" -}}
{{- if gt (include "pathwatch.shards" . | int) 1 -}}true{{- end -}}
{{- end }}

{{/*
The headless Service that gives each shard pod its stable DNS name
<fullname>-<ordinal>.<fullname>-headless.<namespace>.svc.
*/}}
{{- define "pathwatch.headlessName" -}}
{{- printf "%s-headless" (include "pathwatch.fullname" .) -}}
{{- end }}

{{/*
The clusters (names or globs) shard `ordinal` owns, as a JSON list (empty when unassigned).
Argument: dict "ctx" $ "ordinal" N.
*/}}
{{- define "pathwatch.shardClusters" -}}
{{- $assigned := .ctx.Values.shardClusters | default dict -}}
{{- get $assigned (toString .ordinal) | default list | toJson -}}
{{- end }}

{{/*
Shard `ordinal`'s config file: pathwatch's config with shard.name (the pod's name,
<fullname>-<ordinal>) and shard.clusters (its assignment). Argument: dict "ctx" $ "ordinal" N.
*/}}
{{- define "pathwatch.shardConfigYaml" -}}
{{- $config := include "pathwatch.configDict" .ctx | fromJson -}}
{{- $name := printf "%s-%d" (include "pathwatch.fullname" .ctx) (int .ordinal) -}}
{{- $clusters := include "pathwatch.shardClusters" . | fromJsonArray -}}
{{- $_ := set $config "shard" (dict "name" $name "clusters" $clusters) -}}
{{- toYaml $config -}}
{{- end }}

{{/*
Every shard's config file, in ordinal order; its sha256 is the pods' checksum/config annotation.
*/}}
{{- define "pathwatch.shardConfigsYaml" -}}
{{- range $i := until (include "pathwatch.shards" . | int) }}
# config-{{ $i }}.yaml
{{ include "pathwatch.shardConfigYaml" (dict "ctx" $ "ordinal" $i) }}
{{- end }}
{{- end }}

{{/*
Refuses values that cannot make a working set of shards; renders nothing otherwise. Included by
every template that depends on the shard settings.
*/}}
{{- define "pathwatch.shards.validate" -}}
{{- $shards := include "pathwatch.shards" . | int -}}
{{- $assigned := .Values.shardClusters | default dict -}}
{{- $fullname := include "pathwatch.fullname" . -}}
{{- if le $shards 1 -}}
{{- range $key, $clusters := $assigned -}}
{{- if $clusters -}}
{{- fail (printf "shardClusters assigns clusters to shard %s, but shards is %d: the assignment applies only with shards > 1 (a single replica owns every cluster; narrow it with config.shard.clusters). Raise shards or remove shardClusters." $key $shards) -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- if gt (len $fullname) 52 -}}
{{- fail (printf "shards: the StatefulSet name %q is longer than 52 characters (Kubernetes labels each pod with <name>-<revision hash>, at most 63): set fullnameOverride to a shorter name." $fullname) -}}
{{- end -}}
{{- if semverCompare "<1.28.0-0" .Capabilities.KubeVersion.Version -}}
{{- fail (printf "shards > 1 needs Kubernetes 1.28 or later (this is %s): each shard picks its config file by the pod label apps.kubernetes.io/pod-index, which the StatefulSet controller sets from 1.28 on." .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if .Values.persistence.existingClaim -}}
{{- fail "shards > 1: persistence.existingClaim cannot be used, every shard needs a volume of its own (the StatefulSet's volumeClaimTemplates create them). Remove existingClaim." -}}
{{- end -}}
{{- if ne .Values.service.type "ClusterIP" -}}
{{- fail (printf "shards > 1: service.type %s cannot address one shard; with shards the chart renders only the headless Service %s (each shard reached by its own DNS name). Keep service.type ClusterIP and expose shards yourself if needed." .Values.service.type (include "pathwatch.headlessName" .)) -}}
{{- end -}}
{{- if dig "shard" dict (.Values.config | default dict) -}}
{{- fail "shards > 1: config.shard is set per shard by the chart (shard.name is the pod's name, shard.clusters comes from shardClusters). Remove config.shard and assign the clusters in shardClusters." -}}
{{- end -}}
{{- $missing := list -}}
{{- range $i := until $shards -}}
{{- $clusters := get $assigned (toString $i) | default list -}}
{{- $named := list -}}
{{- range $clusters -}}{{- if trim (toString .) -}}{{- $named = append $named . -}}{{- end -}}{{- end -}}
{{- if not $named -}}
{{- $missing = append $missing (printf "%d (%s-%d)" $i $fullname $i) -}}
{{- end -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "shards is %d but shardClusters assigns no cluster to shard %s: every shard must own at least one cluster name or glob, so that ownership changes only on purpose. Give each ordinal its list, e.g. shardClusters: {\"0\": [prod-eu], \"1\": [\"staging-*\"]}; [\"*\"] owns every cluster (for a loadbalancing gateway that spreads clusters itself)." $shards (join ", " $missing)) -}}
{{- end -}}
{{- range $key, $clusters := $assigned -}}
{{- if and $clusters (ge (atoi $key) $shards) -}}
{{- fail (printf "shardClusters assigns clusters to shard %s, but shards is %d (ordinals 0 to %d): no pod would own them. Move those clusters to a running shard, then drop the entry (set it to null)." $key $shards (sub $shards 1)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}
