{{/* The Deployment's name and selector: the release's. */}}
{{- define "pipeline.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* tenants/T/applications/A/pipelines/P */}}
{{- define "pipeline.resource" -}}
tenants/{{ .Values.pipeline.tenant }}/applications/{{ .Values.pipeline.application }}/pipelines/{{ .Values.pipeline.name }}
{{- end -}}

{{- define "pipeline.labels" -}}
app.kubernetes.io/name: {{ include "pipeline.fullname" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: pipeline-manager
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* The restricted Pod Security Standard, for every pod of the chart. */}}
{{- define "pipeline.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  fsGroup: 65532
  seccompProfile: { type: RuntimeDefault }
automountServiceAccountToken: false
{{- end -}}

{{- define "pipeline.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: { drop: [ALL] }
{{- end -}}

{{/* A client's id and secret from a Secret, as pm-agent and pmctl read them. */}}
{{- define "pipeline.credentials" -}}
- name: PM_CLIENT_ID
  valueFrom: { secretKeyRef: { name: {{ . }}, key: client-id } }
- name: PM_CLIENT_SECRET
  valueFrom: { secretKeyRef: { name: {{ . }}, key: client-secret } }
{{- end -}}

{{/* One executor container: (dict "executor" E "root" $). As a native sidecar it restarts
with the pod and has a startup probe: the agent starts once every executor listens. */}}
{{- define "pipeline.executor" -}}
{{- $e := .executor -}}
{{- $socket := printf "/mnt/pipe/.sockets/%s.sock" $e.name -}}
- name: {{ $e.name }}
  image: {{ $e.image }}
  {{- if .root.Values.nativeSidecars }}
  restartPolicy: Always
  startupProbe:
    exec: { command: ["/pm-bin/pm-agent", "exec-server-ready", "--socket", "{{ $socket }}"] }
    periodSeconds: 1
    failureThreshold: 120
  {{- end }}
  command:
    - /pm-bin/pm-agent
    - exec-server
    - --socket
    - {{ $socket }}
    - --work-dir-at
    - /mnt/pipe
    {{- range $e.passEnv }}
    - --pass-env
    - {{ . }}
    {{- end }}
  # The root filesystem is read-only: tools that write a home or temp files get /tmp.
  env:
    - { name: HOME, value: /tmp }
    - { name: TMPDIR, value: /tmp }
    {{- with $e.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml ($e.resources | default (dict "requests" (dict "cpu" "50m" "memory" "64Mi") "limits" (dict "memory" "512Mi"))) | nindent 4 }}
  {{- include "pipeline.containerSecurity" .root | nindent 2 }}
  volumeMounts:
    - { name: pipe, mountPath: /mnt/pipe }
    - { name: pm-bin, mountPath: /pm-bin }
    - { name: tmp, mountPath: /tmp }
{{- end -}}
