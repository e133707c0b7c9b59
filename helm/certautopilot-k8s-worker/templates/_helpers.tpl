{{/*
Names. Kubernetes caps names and label values at 63 characters: every name is cut to 63
and loses a trailing "-" the cut may leave (the cert-manager chart's convention).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "cap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>", or fullnameOverride; the release name alone when it already holds the chart name. */}}
{{- define "cap.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>", cut to 63 AFTER the suffix is added. Call: include "cap.componentName" (list . "flower") */}}
{{- define "cap.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "cap.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "cap.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "cap.labels" -}}
helm.sh/chart: {{ include "cap.chart" . }}
app.kubernetes.io/name: {{ include "cap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: certautopilot
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component. Call: include "cap.selectorLabels" (list . "worker") */}}
{{- define "cap.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "cap.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The ServiceAccount the worker runs as. */}}
{{- define "cap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cap.fullname" .) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the KEK, the connection URLs and Flower's login. */}}
{{- define "cap.secretName" -}}
{{- default (include "cap.fullname" .) .Values.secret.existingSecret -}}
{{- end -}}

{{/*
Secret values by logical name -> the key that holds it in the Secret, as JSON; only the ones
that are configured. existingSecret: secret.existingSecretKeys (an empty mapping means "not
in my Secret"); otherwise the chart-managed Secret, which holds exactly the values given.
The chart never generates a secret value: a value made at render time differs on every
render (helm template, Argo CD), and a new KEK makes every stored credential unreadable.
*/}}
{{- define "cap.secretKeys" -}}
{{- $keys := dict -}}
{{- if .Values.secret.existingSecret -}}
{{- range $name, $key := .Values.secret.existingSecretKeys -}}
{{- if $key -}}{{- $_ := set $keys $name $key -}}{{- end -}}
{{- end -}}
{{- else -}}
{{- $given := dict "kek" .Values.secret.kek "databaseUrl" .Values.secret.databaseUrl "brokerUrl" .Values.secret.brokerUrl "resultBackend" .Values.secret.resultBackend "flowerBasicAuth" .Values.flower.basicAuth -}}
{{- range $name, $value := $given -}}
{{- if $value -}}{{- $_ := set $keys $name (get (include "cap.secretFiles" $ | fromJson) $name).key -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $keys -}}
{{- end -}}

{{/*
Each secret value: its key in the chart-managed Secret, its file name under the secrets
mount and the *_FILE setting that names the file (worker/platform/settings.py).
*/}}
{{- define "cap.secretFiles" -}}
{{- toJson (dict
  "kek" (dict "key" "CAP_KEK" "file" "kek" "env" "CAP_KEK_FILE")
  "databaseUrl" (dict "key" "CAP_DATABASE_URL" "file" "database-url" "env" "CAP_DATABASE_URL_FILE")
  "brokerUrl" (dict "key" "CAP_BROKER_URL" "file" "broker-url" "env" "CAP_BROKER_URL_FILE")
  "resultBackend" (dict "key" "CAP_RESULT_BACKEND" "file" "result-backend" "env" "CAP_RESULT_BACKEND_FILE")
  "flowerBasicAuth" (dict "key" "FLOWER_BASIC_AUTH" "file" "flower-basic-auth" "env" "FLOWER_BASIC_AUTH_FILE")
) -}}
{{- end -}}

{{/* Where every pod mounts its secret files (read-only, mode 0440, group fsGroup). */}}
{{- define "cap.secretsDir" -}}/etc/certautopilot/secrets{{- end -}}

{{/*
The secret values one component needs, among the configured ones, as a JSON list of names.
Call: include "cap.componentSecrets" (list . "worker"). Flower reads no stored credential:
no KEK and no database. The migration needs the database and (the settings loader insists
on one with an external database) the KEK, never the broker.
*/}}
{{- define "cap.componentSecrets" -}}
{{- $root := index . 0 -}}
{{- $wanted := get (dict
  "worker" (list "kek" "databaseUrl" "brokerUrl" "resultBackend")
  "migrate" (list "kek" "databaseUrl")
  "flower" (list "brokerUrl" "flowerBasicAuth")
) (index . 1) -}}
{{- $keys := include "cap.secretKeys" $root | fromJson -}}
{{- $names := list -}}
{{- range $wanted -}}{{- if hasKey $keys . -}}{{- $names = append $names . -}}{{- end -}}{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* The *_FILE variables of one component. Call: include "cap.secretEnv" (list . "worker") */}}
{{- define "cap.secretEnv" -}}
{{- $root := index . 0 -}}
{{- $files := include "cap.secretFiles" $root | fromJson -}}
{{- range include "cap.componentSecrets" (list $root (index . 1)) | fromJsonArray }}
- name: {{ (get $files .).env }}
  value: {{ printf "%s/%s" (include "cap.secretsDir" $root) (get $files .).file }}
{{- end }}
{{- end -}}

{{/*
The secret volume of one component: only the keys it needs, as files. Empty when it needs
none. Call: include "cap.secretVolume" (list . "worker" [secretName])
*/}}
{{- define "cap.secretVolume" -}}
{{- $root := index . 0 -}}
{{- $names := include "cap.componentSecrets" (list $root (index . 1)) | fromJsonArray -}}
{{- if $names -}}
{{- $files := include "cap.secretFiles" $root | fromJson -}}
{{- $keys := include "cap.secretKeys" $root | fromJson -}}
{{- $secretName := include "cap.secretName" $root -}}
{{- if gt (len .) 2 -}}{{- $secretName = index . 2 -}}{{- end }}
- name: secrets
  secret:
    secretName: {{ $secretName }}
    defaultMode: 0440
    items:
      {{- range $names }}
      - key: {{ get $keys . }}
        path: {{ (get $files .).file }}
      {{- end }}
{{- end -}}
{{- end -}}

{{/* The mount of that volume (nothing when the component needs no secret). */}}
{{- define "cap.secretMount" -}}
{{- if include "cap.componentSecrets" (list (index . 0) (index . 1)) | fromJsonArray -}}
- name: secrets
  mountPath: {{ include "cap.secretsDir" (index . 0) }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "cap.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* True ("true") when database and broker are external, so several pods share one state. */}}
{{- define "cap.externalState" -}}
{{- $keys := include "cap.secretKeys" . | fromJson -}}
{{- if and (hasKey $keys "databaseUrl") (hasKey $keys "brokerUrl") -}}
true
{{- end -}}
{{- end -}}

{{/*
Namespaces that get the distributor Role: rbac.targetNamespaces, none by default. Never the
release namespace, which holds the KEK's Secret (cap.validate refuses it).
*/}}
{{- define "cap.targetNamespaces" -}}
{{- toJson (.Values.rbac.targetNamespaces | default list | uniq) -}}
{{- end -}}

{{/*
Refuse values that render but cannot work, with the fix in the message. Included by the
worker Deployment, so every render runs it.
*/}}
{{- define "cap.validate" -}}
{{- if le (int .Values.worker.terminationGracePeriodSeconds) (int .Values.config.taskTimeLimit) -}}
{{- fail (printf "worker.terminationGracePeriodSeconds (%v) must exceed config.taskTimeLimit (%v): a stopping worker needs the time to finish its running, late-acknowledged tasks. Raise worker.terminationGracePeriodSeconds." .Values.worker.terminationGracePeriodSeconds .Values.config.taskTimeLimit) -}}
{{- end -}}
{{- if le (int .Values.config.brokerVisibilityTimeout) (int .Values.config.taskTimeLimit) -}}
{{- fail (printf "config.brokerVisibilityTimeout (%v) must exceed config.taskTimeLimit (%v), or Redis redelivers tasks that are still running. Raise config.brokerVisibilityTimeout." .Values.config.brokerVisibilityTimeout .Values.config.taskTimeLimit) -}}
{{- end -}}
{{- if and (not (include "cap.externalState" .)) (or .Values.autoscaling.enabled (gt (int .Values.worker.replicaCount) 1)) -}}
{{- fail "several worker pods need a shared database and broker: set secret.databaseUrl and secret.brokerUrl (or secret.existingSecret), or keep worker.replicaCount=1 without autoscaling (the embedded default is per pod)." -}}
{{- end -}}
{{- $keys := include "cap.secretKeys" . | fromJson -}}
{{- if and (hasKey $keys "databaseUrl") (not (hasKey $keys "kek")) -}}
{{- fail "an external database needs a key-encryption key, and the chart never generates one (a key made at render time changes with every `helm template` or Argo CD sync, and a new key makes every stored credential unreadable). Generate one once with: echo \"k1:$(head -c 32 /dev/urandom | base64)\", keep a copy, and set secret.kek (or secret.existingSecret with secret.existingSecretKeys.kek)." -}}
{{- end -}}
{{- if and .Values.flower.enabled (not (hasKey $keys "flowerBasicAuth")) -}}
{{- fail "flower.enabled needs a login, and the chart never generates one: set flower.basicAuth=user:password (or secret.existingSecret with secret.existingSecretKeys.flowerBasicAuth)." -}}
{{- end -}}
{{- if and .Values.rbac.create (has .Release.Namespace (include "cap.targetNamespaces" . | fromJsonArray)) -}}
{{- fail (printf "rbac.targetNamespaces holds the release namespace %q, where the Secret with the key-encryption key lives: the worker's Role (secrets get) would let it, and anyone running as it, read the KEK. Distribute into other namespaces, or install the release into its own namespace." .Release.Namespace) -}}
{{- end -}}
{{- if and .Values.autoscaling.keda.enabled (not .Values.autoscaling.keda.redisAddress) -}}
{{- fail "autoscaling.keda.enabled needs autoscaling.keda.redisAddress (host:port of the broker's Redis) to read the length of the queue." -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas (%v) exceeds autoscaling.maxReplicas (%v); lower minReplicas or raise maxReplicas." .Values.autoscaling.minReplicas .Values.autoscaling.maxReplicas) -}}
{{- end -}}
{{- end -}}

{{/*
Environment shared by worker, migration, Flower and the test pod: settings from the
ConfigMap (envFrom), the pod layout here. Secret values are files (cap.secretEnv), never
environment variables.
*/}}
{{- define "cap.env" -}}
# Fixed by the pod layout: the root filesystem is read-only, this folder is an emptyDir.
- name: CAP_DATA_DIR
  value: /var/lib/certautopilot
- name: CAP_HEARTBEAT_FILE
  value: /var/lib/certautopilot/worker-heartbeat
- name: CAP_SERVICEACCOUNT_DIR
  value: /var/run/secrets/kubernetes.io/serviceaccount
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* envFrom shared by worker, migration and Flower. */}}
{{- define "cap.envFrom" -}}
- configMapRef:
    name: {{ include "cap.fullname" . }}
{{- end -}}

{{/* Pod-level fields shared by every pod. */}}
{{- define "cap.podCommon" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{ end -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
# Service links would inject one variable per Service of the namespace: noise, never needed.
enableServiceLinks: false
{{- end -}}

{{/*
Rolls the pods when the ConfigMap changes. Deliberately no checksum of the Secret: a hash of a
URL with a weak password in a pod annotation invites an offline guess. After changing a
secret value, run `kubectl rollout restart deployment/<name>` (docs/deployment.md).
*/}}
{{- define "cap.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end -}}
