{{- define "kiln.labels" -}}
app.kubernetes.io/name: kiln
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kiln.selector" -}}
app.kubernetes.io/name: kiln
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kiln.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "kiln.watchedNamespaces" -}}
{{- $names := list -}}
{{- range splitList "," .Values.settings.namespaces -}}
{{- if trim . -}}{{- $names = append $names (trim .) -}}{{- end -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/* What the operator does in the namespaces it watches. */}}
{{- define "kiln.workRules" -}}
- apiGroups: [kiln.dev]
  resources: [imagetemplates, imagebuildruns]
  verbs: [get, list, watch, create, patch, update]
- apiGroups: [kiln.dev]
  resources: [imagetemplates/status, imagebuildruns/status]
  verbs: [get, patch, update]
# Per-namespace Azure identities: a template's ServiceAccount (its workload identity
# annotations) and a token for it, exchanged with Entra ID for that namespace's identity.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get]
- apiGroups: [""]
  resources: [serviceaccounts/token]
  verbs: [create]
# spec.exportOutputs: the ConfigMap with a template's latest outputs.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
