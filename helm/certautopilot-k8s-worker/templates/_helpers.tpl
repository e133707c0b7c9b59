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

{{/* The Secret holding CAP_KEK, the connection URLs and FLOWER_BASIC_AUTH. */}}
{{- define "cap.secretName" -}}
{{- default (include "cap.fullname" .) .Values.secret.existingSecret -}}
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
{{- if or .Values.secret.existingSecret (and .Values.secret.databaseUrl .Values.secret.brokerUrl) -}}
true
{{- end -}}
{{- end -}}

{{/* Namespaces that get the distributor Role: rbac.targetNamespaces, else the release namespace. */}}
{{- define "cap.targetNamespaces" -}}
{{- $namespaces := .Values.rbac.targetNamespaces | default (list .Release.Namespace) -}}
{{- toJson ($namespaces | uniq) -}}
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
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas (%v) exceeds autoscaling.maxReplicas (%v); lower minReplicas or raise maxReplicas." .Values.autoscaling.minReplicas .Values.autoscaling.maxReplicas) -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by worker, migration and Flower: secrets by reference, settings from the ConfigMap. */}}
{{- define "cap.env" -}}
- name: CAP_KEK
  valueFrom:
    secretKeyRef:
      name: {{ include "cap.secretName" . }}
      key: CAP_KEK
{{- range $key := list "CAP_DATABASE_URL" "CAP_BROKER_URL" "CAP_RESULT_BACKEND" }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ include "cap.secretName" $ }}
      key: {{ $key }}
      # Absent key: the worker falls back to the embedded default for this connection.
      optional: true
{{- end }}
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
