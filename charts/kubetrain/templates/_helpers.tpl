{{/* Names and labels shared by every object of the chart. */}}

{{- define "kubetrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; `kubetrain` for `helm install kubetrain ...`. */}}
{{- define "kubetrain.fullname" -}}
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

{{- define "kubetrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetrain.labels" -}}
helm.sh/chart: {{ include "kubetrain.chart" . }}
{{ include "kubetrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetrain
{{- end }}

{{- define "kubetrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetrain.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetrain.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The operator's configuration file: the `config` values without the nulls, so that the
operator's built-in defaults apply to what the user left unset.
*/}}
{{- define "kubetrain.config" -}}
{{- $config := dict }}
{{- range $key, $value := .Values.config }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
"true" when image .image is allowed by the list .allowed of policy.allowedImages, by the
rule the ValidatingAdmissionPolicy applies to spec.image (templates/policy.yaml): an entry
ending in "/" allows every image under it, any other entry is a repository and allows its
tags and digests.
*/}}
{{- define "kubetrain.imageAllowed" -}}
{{- $image := .image }}
{{- range .allowed }}
{{- if hasSuffix "/" . }}
{{- if hasPrefix . $image }}true{{ end }}
{{- else if or (eq $image .) (hasPrefix (printf "%s:" .) $image) (hasPrefix (printf "%s@" .) $image) }}true
{{- end }}
{{- end }}
{{- end }}
