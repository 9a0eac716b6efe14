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

{{/* The driver arguments both pods share: pool, name, logging and, when metrics are on, the
metrics listener. Callers indent the result with `with`. */}}
{{- define "blockcsi.driverArgs" -}}
- --pool={{ .Values.pool.hostPath }}
- --driver-name={{ .Values.driverName }}
- --log-level={{ .Values.driver.logLevel }}
- --log-format={{ .Values.driver.logFormat }}
{{- if .Values.metrics.enabled }}
- --metrics-address=0.0.0.0:{{ .Values.metrics.driverPort }}
{{- end }}
{{- end -}}

{{/* The CSI socket as an environment variable: `serve`, `ctl` and `doctor` all read
CSI_ENDPOINT, so a command run with `kubectl exec` dials the socket the driver serves. */}}
{{- define "blockcsi.endpointEnv" -}}
- name: CSI_ENDPOINT
  value: unix:///csi/csi.sock
{{- end -}}

{{/*
Whether an optional API feature is rendered: value false never, true always, "auto" when the
cluster serves the API group version. Call with (dict "value" V "api" "group/version" "ctx" $);
prints "true" or nothing.
*/}}
{{- define "blockcsi.apiEnabled" -}}
{{- $v := .value -}}
{{- if eq (toString $v) "true" -}}
true
{{- else if and (eq (toString $v) "auto") (.ctx.Capabilities.APIVersions.Has .api) -}}
true
{{- end -}}
{{- end -}}

{{- define "blockcsi.snapshots" -}}
{{- include "blockcsi.apiEnabled" (dict "value" .Values.snapshots.enabled "api" "snapshot.storage.k8s.io/v1" "ctx" .) -}}
{{- end -}}

{{/* Container security settings of the unprivileged containers (the pod sets the seccomp
profile). */}}
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
{{- if include "blockcsi.snapshots" . }}{{ $names = append $names "snapshotter" }}{{ end -}}
{{- if .Values.sidecars.resizer.enabled }}{{ $names = append $names "resizer" }}{{ end -}}
{{- join " " $names -}}
{{- end -}}

{{/* The metrics port names of the sidecars (at most 15 characters). */}}
{{- define "blockcsi.sidecarPortName" -}}
{{- index (dict "provisioner" "http-prov" "attacher" "http-attach" "snapshotter" "http-snap" "resizer" "http-resize") . -}}
{{- end -}}
