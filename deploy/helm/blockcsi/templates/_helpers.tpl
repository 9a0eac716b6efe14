{{/*
Names, labels and images shared by every template.
*/}}

{{/* The base name of every object: the release name, cut to leave room for suffixes. */}}
{{- define "blockcsi.name" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "blockcsi.labels" -}}
app.kubernetes.io/name: blockcsi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels must never change after install: no version in them. */}}
{{- define "blockcsi.selector" -}}
app.kubernetes.io/name: blockcsi
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "blockcsi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The image of a sidecar; call with (dict "s" .Values.sidecars.NAME). */}}
{{- define "blockcsi.sidecarImage" -}}
{{- printf "%s:%s" .s.image.repository .s.image.tag -}}
{{- end -}}

{{/* The socket path, on the node, that kubelet and the registrar use. */}}
{{- define "blockcsi.nodeSocketDir" -}}
{{- printf "%s/plugins/%s" .Values.kubeletDir .Values.driverName -}}
{{- end -}}

{{/* The pool volume: the host path unless another volume source is given. */}}
{{- define "blockcsi.poolVolume" -}}
- name: pool
{{- if .Values.pool.volume }}
{{ toYaml .Values.pool.volume | indent 2 }}
{{- else }}
  hostPath:
    path: {{ .Values.pool.hostPath }}
    type: DirectoryOrCreate
{{- end }}
{{- end -}}

{{/* The driver's log format and, when metrics are on, its metrics listener. */}}
{{/* Callers indent the result with `with`. */}}
{{- define "blockcsi.observabilityArgs" -}}
- --log-format={{ .Values.logFormat }}
{{- if .Values.metrics.enabled }}
- --metrics-address=0.0.0.0:{{ .Values.metrics.driverPort }}
{{- end }}
{{- end -}}

{{/* Container security settings of the unprivileged containers. */}}
{{- define "blockcsi.restricted" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
{{- end -}}

{{/* The controller sidecars this release runs, as a list of names. */}}
{{- define "blockcsi.controllerSidecars" -}}
{{- $names := list "provisioner" "attacher" -}}
{{- if .Values.sidecars.snapshotter.enabled }}{{ $names = append $names "snapshotter" }}{{ end -}}
{{- if .Values.sidecars.resizer.enabled }}{{ $names = append $names "resizer" }}{{ end -}}
{{- join " " $names -}}
{{- end -}}
