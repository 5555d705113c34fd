{{/* ETCD_INITIAL_CLUSTER: every member of the StatefulSet by its stable name. */}}
{{- define "platform.etcdCluster" -}}
{{- $members := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $members = append $members (printf "etcd-%d=http://etcd-%d.etcd:2380" $i $i) -}}
{{- end -}}
{{- join "," $members -}}
{{- end -}}

{{/* A gRPC probe's port: (list $ PORT). With TLS, kubelet's plaintext probes ask the
health-only port 8081 instead. */}}
{{- define "platform.probePort" -}}
{{- $root := index . 0 -}}
{{- if $root.Values.tls.enabled }}8081{{ else }}{{ index . 1 }}{{ end -}}
{{- end -}}
