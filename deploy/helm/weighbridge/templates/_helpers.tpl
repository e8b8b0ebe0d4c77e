{{/* weighbridge.name: the chart name, or nameOverride. */}}
{{- define "weighbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* weighbridge.fullname: "<release>-<name>" (or fullnameOverride), the prefix of every resource. */}}
{{- define "weighbridge.fullname" -}}
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

{{/* weighbridge.labels: the common labels; pass (dict "ctx" $ "component" "proxy"). */}}
{{- define "weighbridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: weighbridge
{{ include "weighbridge.selectorLabels" . }}
{{- end }}

{{/* weighbridge.selectorLabels: the labels selectors match on; same argument as weighbridge.labels. */}}
{{- define "weighbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weighbridge.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* weighbridge.image: the weighbridge image reference. */}}
{{- define "weighbridge.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* weighbridge.etcdEndpoints: what --etcd gets, for either etcd mode. */}}
{{- define "weighbridge.etcdEndpoints" -}}
{{- if eq .Values.etcd.mode "bundled" -}}
{{ include "weighbridge.fullname" . }}-etcd:2379
{{- else -}}
{{ join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* weighbridge.podSecurityContext: non-root, default seccomp, for every pod. */}}
{{- define "weighbridge.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* weighbridge.containerSecurityContext: read-only root, no privilege escalation, no capabilities. */}}
{{- define "weighbridge.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* weighbridge.flags: container args "- --FLAG=VALUE", one line per (list "FLAG" VALUE) pair whose
value is set; empty when none is. A null (or absent) value renders nothing, so the binary's own
default applies and the chart never repeats it; 0 and false are set values. Whole numbers
print as integers (numbers from a values file arrive as floats), others as they are (0.5). */}}
{{- define "weighbridge.flags" -}}
{{- $lines := list }}
{{- range . }}
{{- $value := index . 1 }}
{{- if not (kindIs "invalid" $value) }}
{{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}{{ $value = int64 $value }}{{ end }}
{{- $lines = append $lines (printf "- --%s=%v" (index . 0) $value) }}
{{- end }}
{{- end }}
{{- join "\n" $lines }}
{{- end }}

{{/* weighbridge.etcdTLS: "true" when the controller, proxies and wbctl speak TLS to etcd with client
certificates (bundled etcd with etcd.tls.enabled, or external etcd given client Secrets), else "". */}}
{{- define "weighbridge.etcdTLS" -}}
{{- if eq .Values.etcd.mode "bundled" -}}
{{- if .Values.etcd.tls.enabled }}true{{ end }}
{{- else if or .Values.etcd.external.tls.controllerSecretName .Values.etcd.external.tls.proxySecretName -}}
{{- $_ := required "etcd.external.tls: set both controllerSecretName and proxySecretName" (and .Values.etcd.external.tls.controllerSecretName .Values.etcd.external.tls.proxySecretName) -}}
true
{{- end }}
{{- end }}

{{/* weighbridge.etcdClientSecret: the Secret (ca.crt, tls.crt, tls.key) with a client certificate for
etcd; pass (dict "ctx" $ "user" "controller"|"proxy"|"root"). Bundled: the chart's own (CN
weighbridge-controller, weighbridge-proxy, root); external: the one etcd.external.tls names. */}}
{{- define "weighbridge.etcdClientSecret" -}}
{{- if eq .ctx.Values.etcd.mode "bundled" -}}
{{ include "weighbridge.fullname" .ctx }}-etcd-{{ .user }}
{{- else -}}
{{ index .ctx.Values.etcd.external.tls (printf "%sSecretName" .user) }}
{{- end }}
{{- end }}

{{/* weighbridge.etcdTLSDir: where the etcd client Secret is mounted, as a directory (a Secret
mounted under subPath never sees its updates). */}}
{{- define "weighbridge.etcdTLSDir" -}}
/etc/weighbridge/etcd
{{- end }}

{{/* weighbridge.etcdTLSArgs: the etcd client TLS flags, for the files in weighbridge.etcdTLSDir. */}}
{{- define "weighbridge.etcdTLSArgs" -}}
{{- $dir := include "weighbridge.etcdTLSDir" . -}}
- --etcd-cacert={{ $dir }}/ca.crt
- --etcd-cert={{ $dir }}/tls.crt
- --etcd-key={{ $dir }}/tls.key
{{- end }}

{{/* weighbridge.etcdTLSMount: the volumeMount of weighbridge.etcdTLSVolume at weighbridge.etcdTLSDir. */}}
{{- define "weighbridge.etcdTLSMount" -}}
- {name: etcd-tls, mountPath: {{ include "weighbridge.etcdTLSDir" . }}, readOnly: true}
{{- end }}

{{/* weighbridge.etcdTLSVolume: the etcd client Secret as a volume; same argument as
weighbridge.etcdClientSecret. Readable by the pods' group only (fsGroup 65532). */}}
{{- define "weighbridge.etcdTLSVolume" -}}
- name: etcd-tls
  secret:
    secretName: {{ include "weighbridge.etcdClientSecret" . }}
    defaultMode: 0440
{{- end }}
