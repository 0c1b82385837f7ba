{{/* Names ------------------------------------------------------------------------------------------------ */}}
{{- define "m1serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The RayService name. KubeRay derives RayCluster, Service and pod names from it, so keep it short. */}}
{{- define "m1serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "m1serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "m1serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "m1serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "m1serve.labels" -}}
helm.sh/chart: {{ include "m1serve.chart" . }}
{{ include "m1serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: m1serve
{{- end }}

{{- define "m1serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "m1serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "m1serve.serveServiceName" -}}
{{- printf "%s-serve" (include "m1serve.fullname" .) }}
{{- end }}

{{- define "m1serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The model name served in /v1/models: model.name, else the checkpoint folder's name (as the app builder does). */}}
{{- define "m1serve.servedModelName" -}}
{{- default (base .Values.model.path) .Values.model.name }}
{{- end }}

{{/* Custom Ray resources that pin the Router to the router pod and each ExpertShard to a shard pod. */}}
{{- define "m1serve.routerResource" -}}m1serve_router{{- end }}
{{- define "m1serve.shardResource" -}}m1serve_shard{{- end }}

{{/* Checks JSON schema cannot express (and the ones that must hold even with --skip-schema-validation).
     Every message names the value, what it is and what would be valid. */}}
{{- define "m1serve.validate" -}}
{{- $experts := int .Values.model.numExperts }}
{{- $shards := int .Values.shards.count }}
{{- $pods := int .Values.shards.pods }}
{{- if lt $experts 1 }}
{{- fail (printf "\n\nm1serve: model.numExperts=%v must be a positive integer (MiniMax-M1 has 32 experts)." .Values.model.numExperts) }}
{{- end }}
{{- if lt $shards 1 }}
{{- fail (printf "\n\nm1serve: shards.count=%v must be at least 1." .Values.shards.count) }}
{{- end }}
{{- if ne (float64 $shards) (float64 .Values.shards.count) }}
{{- fail (printf "\n\nm1serve: shards.count=%v must be a whole number." .Values.shards.count) }}
{{- end }}
{{- if and .Values.router.experts (mod $experts (add $shards 1)) }}
{{- $ok := list }}
{{- range $d := untilStep 2 (int (add $experts 1)) 1 }}{{- if not (mod $experts $d) }}{{- $ok = append $ok (sub $d 1) }}{{- end }}{{- end }}
{{- fail (printf "\n\nm1serve: shards.count=%d plus the router's share (router.experts=true) make %d equal shares, which do not divide model.numExperts=%d. Valid shard counts with router.experts: %s." $shards (add $shards 1) $experts (join ", " $ok)) }}
{{- else if and (not .Values.router.experts) (mod $experts $shards) }}
{{- $ok := list }}
{{- range $d := untilStep 1 (int (add $experts 1)) 1 }}{{- if not (mod $experts $d) }}{{- $ok = append $ok $d }}{{- end }}{{- end }}
{{- fail (printf "\n\nm1serve: shards.count=%d does not divide model.numExperts=%d: every expert shard must hold the same number of experts. Valid shard counts: %s." $shards $experts (join ", " $ok)) }}
{{- end }}
{{- if lt $pods 1 }}
{{- fail (printf "\n\nm1serve: shards.pods=%v must be at least 1." .Values.shards.pods) }}
{{- end }}
{{- if mod $shards $pods }}
{{- fail (printf "\n\nm1serve: shards.pods=%d does not divide shards.count=%d: every shard pod must hold the same number of shards." $pods $shards) }}
{{- end }}
{{- if lt (float64 .Values.router.gpus) 0.0 }}
{{- fail (printf "\n\nm1serve: router.gpus=%v is negative; use 0 (CPU) or a whole number of GPUs." .Values.router.gpus) }}
{{- end }}
{{- if ne (float64 (int .Values.router.gpus)) (float64 .Values.router.gpus) }}
{{- fail (printf "\n\nm1serve: router.gpus=%v must be a whole number of GPUs (Kubernetes does not share a GPU between pods)." .Values.router.gpus) }}
{{- end }}
{{- if lt (float64 .Values.shards.gpusPerShard) 0.0 }}
{{- fail (printf "\n\nm1serve: shards.gpusPerShard=%v is negative; use 0 (CPU), a fraction (several shards per GPU) or a whole number." .Values.shards.gpusPerShard) }}
{{- end }}
{{- $podGpus := mulf (float64 .Values.shards.gpusPerShard) (float64 (div $shards $pods)) }}
{{- if ne $podGpus (floor $podGpus) }}
{{- fail (printf "\n\nm1serve: each shard pod would need %v GPUs (%d shards per pod x shards.gpusPerShard=%v); a pod needs a whole number of GPUs. Change shards.gpusPerShard or shards.pods." $podGpus (div $shards $pods) .Values.shards.gpusPerShard) }}
{{- end }}
{{- if or (lt (float64 .Values.router.rayCpus) 0.0) (lt (float64 .Values.shards.rayCpusPerShard) 0.0) }}
{{- fail "\n\nm1serve: router.rayCpus and shards.rayCpusPerShard must not be negative." }}
{{- end }}
{{- if and (eq .Values.weights.source "pvc") (not .Values.weights.pvc.claimName) }}
{{- fail "\n\nm1serve: weights.source=pvc needs weights.pvc.claimName (a PersistentVolumeClaim holding model.path)." }}
{{- end }}
{{- if and (eq .Values.weights.source "init") (not .Values.weights.init.command) }}
{{- fail "\n\nm1serve: weights.source=init needs weights.init.command (the command that writes the checkpoint to model.path)." }}
{{- end }}
{{- if and (ne .Values.weights.source "image") (not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.weights.mountPath)) .Values.model.path)) }}
{{- fail (printf "\n\nm1serve: model.path=%s is not inside weights.mountPath=%s, where the weights (source %s) are mounted." .Values.model.path .Values.weights.mountPath .Values.weights.source) }}
{{- end }}
{{- $ports := list 8000 9000 (int .Values.metrics.port) (int .Values.metrics.dashboardMetricsPort) 6379 8265 10001 52365 }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "\n\nm1serve: metrics.port=%v / metrics.dashboardMetricsPort=%v collide with each other or with a Ray or Serve port (8000, 9000, 6379, 8265, 10001, 52365)." .Values.metrics.port .Values.metrics.dashboardMetricsPort) }}
{{- end }}
{{- range $k, $v := .Values.model.env }}
{{- if not (kindIs "string" $v) }}
{{- fail (printf "\n\nm1serve: model.env.%s=%v must be a string (quote it in YAML)." $k $v) }}
{{- end }}
{{- end }}
{{- end }}

{{/* GPUs of one shard pod (an integer; validated above). */}}
{{- define "m1serve.shardPodGpus" -}}
{{- int (mulf (float64 .Values.shards.gpusPerShard) (float64 (div (int .Values.shards.count) (int .Values.shards.pods)))) }}
{{- end }}

{{/* serveConfigV2: the Serve config KubeRay applies to the cluster (Ray Serve ServeDeploySchema). */}}
{{- define "m1serve.serveConfig" -}}
{{- $v := .Values }}
{{- $m := $v.model }}
{{- $args := dict
      "model" $m.path
      "model_name" (include "m1serve.servedModelName" .)
      "expert_shards" (int $v.shards.count)
      "router_gpus" (int $v.router.gpus)
      "gpus_per_shard" (float64 $v.shards.gpusPerShard)
      "router_cpus" (float64 $v.router.rayCpus)
      "cpus_per_shard" (float64 $v.shards.rayCpusPerShard)
      "shard_resources" (dict (include "m1serve.shardResource" .) 1)
      "max_num_seqs" (int $m.maxNumSeqs)
      "max_num_batched_tokens" (int $m.maxNumBatchedTokens)
      "max_model_len" (int $m.maxModelLen)
      "max_queue_len" (int $m.maxQueueLen)
      "collective_timeout_s" (float64 $m.collectiveTimeoutS)
      "api_key_env" "M1SERVE_API_KEY" }}
{{- if $m.dtype }}{{- $_ := set $args "dtype" $m.dtype }}{{- end }}
{{- if $m.expertDtype }}{{- $_ := set $args "expert_dtype" $m.expertDtype }}{{- end }}
{{- if $v.router.experts }}{{- $_ := set $args "router_experts" true }}{{- end }}
{{- if not (kindIs "invalid" $m.cacheMemoryGB) }}{{- $_ := set $args "cache_memory_gb" (float64 $m.cacheMemoryGB) }}{{- end }}
{{- if $m.env }}{{- $_ := set $args "env" $m.env }}{{- end }}
{{- $args = merge (deepCopy (default dict $m.extraArgs)) $args }}
{{- /* The Router's actor options, as the app builder sets them, plus the custom resource that only the router pod
        has. A config override replaces ray_actor_options whole, hence num_cpus/num_gpus/runtime_env again. */}}
{{- $routerOpts := dict "num_cpus" (float64 $v.router.rayCpus) "num_gpus" (int $v.router.gpus)
      "resources" (dict (include "m1serve.routerResource" .) 1) }}
{{- /* RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the builder's default (cluster.app; replicas on one node see
        each other's GPUs for the peer links), which the model's env may override. */}}
{{- $routerEnv := merge (deepCopy (default dict $m.env)) (dict "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES" "1") }}
{{- $_ := set $routerOpts "runtime_env" (dict "env_vars" $routerEnv) }}
{{- $cfg := dict
      "proxy_location" "EveryNode"
      "http_options" (dict "host" "0.0.0.0" "port" 8000)
      "grpc_options" (dict "port" 9000 "grpc_servicer_functions" (list "cluster.api.m1serve_pb2_grpc.add_M1ServeServicer_to_server"))
      "applications" (list (dict
          "name" "m1serve"
          "route_prefix" "/"
          "import_path" "cluster.app:build_app"
          "args" $args
          "deployments" (list (dict "name" "Router" "ray_actor_options" $routerOpts)))) }}
{{- toYaml $cfg }}
{{- end }}

{{/* rayStartParams `resources` in KubeRay's format: a quoted JSON object, e.g. "{\"m1serve_shard\": 8}". */}}
{{- define "m1serve.rayResourcesParam" -}}
{{- toJson . | quote }}
{{- end }}

{{/* Environment of every Ray container. */}}
{{- define "m1serve.rayEnv" -}}
{{- if eq .Values.service.ingress "haproxy" }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
{{- end }}
{{- if .Values.apiKey.existingSecret }}
- name: M1SERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.existingSecret }}
      key: {{ .Values.apiKey.key }}
{{- end }}
{{- with .Values.containerEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
A Ray pod template. Arguments (dict): root (the chart context), group (head | router | shards), values (the
group's values), gpus (int), rayPorts (list of container ports).
*/}}
{{- define "m1serve.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $g := .values }}
{{- $gpus := int .gpus }}
metadata:
  labels:
    {{- include "m1serve.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .group }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "m1serve.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := concat (default list $g.tolerations) (ternary (default list $v.gpu.tolerations) list (gt $gpus 0)) }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if eq $v.weights.source "init" }}
  initContainers:
    - name: fetch-weights
      image: {{ default (include "m1serve.image" $root) $v.weights.init.image }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command:
        {{- toYaml $v.weights.init.command | nindent 8 }}
      {{- with $v.weights.init.args }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        - name: M1SERVE_RAY_GROUP
          value: {{ .group }}
        - name: M1SERVE_MODEL_PATH
          value: {{ $v.model.path | quote }}
        {{- with $v.weights.init.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- toYaml $v.weights.init.resources | nindent 8 }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: weights
          mountPath: {{ $v.weights.mountPath }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .group "head") }}
      image: {{ include "m1serve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- $env := include "m1serve.rayEnv" $root | trim }}
      {{- if $env }}
      env:
        {{- $env | nindent 8 }}
      {{- end }}
      ports:
        {{- toYaml .rayPorts | nindent 8 }}
      resources:
        {{- $res := deepCopy $g.resources }}
        {{- if gt $gpus 0 }}
        {{- $_ := set $res "limits" (merge (dict $v.gpu.resourceName (toString $gpus)) (default dict $res.limits)) }}
        {{- $_ := set $res "requests" (merge (dict $v.gpu.resourceName (toString $gpus)) (default dict $res.requests)) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- if ne $v.weights.source "image" }}
        - name: weights
          mountPath: {{ $v.weights.mountPath }}
          readOnly: true
          {{- if and (eq $v.weights.source "pvc") $v.weights.pvc.subPath }}
          subPath: {{ $v.weights.pvc.subPath }}
          {{- end }}
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSize }}
    {{- if eq $v.weights.source "pvc" }}
    - name: weights
      persistentVolumeClaim:
        claimName: {{ $v.weights.pvc.claimName }}
        readOnly: {{ $v.weights.pvc.readOnly }}
    {{- else if eq $v.weights.source "hostPath" }}
    - name: weights
      hostPath:
        path: {{ $v.weights.hostPath.path }}
        {{- with $v.weights.hostPath.type }}
        type: {{ . }}
        {{- end }}
    {{- else if eq $v.weights.source "init" }}
    - name: weights
      emptyDir:
        sizeLimit: {{ $v.weights.init.sizeLimit }}
    {{- end }}
{{- end }}
