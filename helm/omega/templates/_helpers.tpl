{{/*
Names and labels shared by every template. Resource names start with the release's full name
(the release name, or "<release>-omega" when the release name does not contain "omega").
*/}}

{{- define "omega.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains "omega" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-omega" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "omega.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: omega
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels of the constellation pods (all shards). */}}
{{- define "omega.constellationSelector" -}}
app.kubernetes.io/name: omega-constellation
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of the federation worker pods. */}}
{{- define "omega.federationSelector" -}}
app.kubernetes.io/name: omega-federation
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Host of the Postgres primary: the CloudNativePG read-write Service, or database.host. */}}
{{- define "omega.databaseHost" -}}
{{- if .Values.database.cnpg.enabled -}}
{{- printf "%s-pg-rw" (include "omega.fullname" .) -}}
{{- else -}}
{{- required "database.host is required when database.cnpg.enabled is false" .Values.database.host -}}
{{- end -}}
{{- end -}}

{{/* A DSN without password (asyncpg reads PGPASSWORD). Call with (list $ "dbname"). */}}
{{- define "omega.databaseUrl" -}}
{{- $root := index . 0 -}}
{{- printf "postgresql://%s@%s:%d/%s" $root.Values.database.user (include "omega.databaseHost" $root) (int $root.Values.database.port) (index . 1) -}}
{{- end -}}

{{/* A settings value as an environment string: lists and maps as JSON, the rest as text. */}}
{{- define "omega.envValue" -}}
{{- if or (kindIs "slice" .) (kindIs "map" .) -}}
{{- toJson . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The restricted pod security context (Pod Security Standards "restricted"). */}}
{{- define "omega.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The restricted container security context. */}}
{{- define "omega.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The database password from the credentials Secret (the DSNs carry none). */}}
{{- define "omega.pgPasswordEnv" -}}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.database }}
      key: password
{{- end -}}

{{/* image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "omega.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
