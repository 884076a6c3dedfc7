{{/*
leader-sidecar library chart: named templates a workload chart includes to add the sidecar.

Every template takes one context dict:
  root      the including chart's top-level context ($)
  values    this library's values, merged by Helm (the dependency aliased `leaderElection`:
            .Values.leaderElection)
  workload  the name of the workload (Deployment/StatefulSet) the chart renders: the default
            election name, and the prefix of the ServiceAccount/Role names

  {{- $ctx := dict "root" $ "values" .Values.leaderElection "workload" (include "app.fullname" .) }}
*/}}

{{/* The election name: `values.election`, else the workload's name. */}}
{{- define "leader-sidecar.electionName" -}}
{{- $name := .values.election | default .workload -}}
{{- required "leader-sidecar: pass `workload` (or set `election`)" $name -}}
{{- end }}

{{/* The Lease name, as the sidecar derives it (sidecar/naming.py): <prefix>-<16 hex of sha256>. */}}
{{- define "leader-sidecar.leaseName" -}}
{{- if .values.leaseName -}}
{{- .values.leaseName -}}
{{- else -}}
{{- printf "%s-%s" .values.leasePrefix (include "leader-sidecar.electionName" . | sha256sum | trunc 16) -}}
{{- end -}}
{{- end }}

{{- define "leader-sidecar.resourceName" -}}
{{- printf "%s-leader-sidecar" (required "leader-sidecar: pass `workload`" .workload | trunc 48 | trimSuffix "-") -}}
{{- end }}

{{- define "leader-sidecar.serviceAccountName" -}}
{{- .values.serviceAccount.name | default (include "leader-sidecar.resourceName" .) -}}
{{- end }}

{{- define "leader-sidecar.labels" -}}
app.kubernetes.io/name: leader-sidecar
app.kubernetes.io/component: leader-election
app.kubernetes.io/part-of: {{ .workload | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/instance: {{ .root.Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
{{- end }}

{{/* Pod annotations that say which Lease the pod's sidecar uses (for people and scripts). */}}
{{- define "leader-sidecar.podAnnotations" -}}
leader-sidecar.io/election: {{ include "leader-sidecar.electionName" . | quote }}
leader-sidecar.io/lease: {{ include "leader-sidecar.leaseName" . | quote }}
{{- end }}

{{/* Env entries for the app containers: where the sidecar's APIs are. */}}
{{- define "leader-sidecar.appEnv" -}}
- name: LEADER_SIDECAR_HTTP
  value: {{ printf "http://127.0.0.1:%v" .values.http.port | quote }}
{{- if .values.grpc.enabled }}
- name: LEADER_SIDECAR_GRPC
  value: {{ printf "127.0.0.1:%v" .values.grpc.port | quote }}
{{- end }}
{{- with .values.apiToken }}
{{- if .secretName }}
- name: LEADER_SIDECAR_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .secretName | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* `false` when only the sidecar gets the token (through leader-sidecar.volumes). */}}
{{- define "leader-sidecar.automountServiceAccountToken" -}}
{{- not .values.serviceAccount.tokenOnlyInSidecar -}}
{{- end }}

{{/*
The probe: a few lines of Python run inside the sidecar container (exec probe, no shell), asking
the loopback HTTP API. Only `socket` is imported (http.client would load the email package, and
resolving a name the idna codec): Python's start-up is most of the cost. It prints the status and
the body, which the kubelet shows in the probe's event (e.g. why /readyz is 503).
Arguments: port, path, timeout.
*/}}
{{- define "leader-sidecar.probeScript" -}}
import socket, sys
port, path, timeout = sys.argv[1:]
try:
    with socket.socket() as s:
        s.settimeout(float(timeout))
        s.connect(("127.0.0.1", int(port)))
        s.sendall(b"GET %s HTTP/1.0\r\n\r\n" % path.encode())
        answer = b"".join(iter(lambda: s.recv(4096), b""))
except OSError as e:
    sys.exit(f"{path}: {e!r}")
head, _, body = answer.partition(b"\r\n\r\n")
status = head.split(b" ")[1:2]
print(b" ".join(status).decode(), body.decode(errors="replace"))
sys.exit(status != [b"200"])
{{- end }}

{{/* An exec probe; takes (list ctx probeValues). */}}
{{- define "leader-sidecar.probe" -}}
{{- $ctx := index . 0 -}}{{- $probe := index . 1 -}}
exec:
  command:
    - python
    - -I
    - -S
    - -c
    - |-
      {{- include "leader-sidecar.probeScript" $ctx | nindent 6 }}
    - {{ $ctx.values.http.port | toString | quote }}
    - {{ $probe.path | quote }}
    - {{ $probe.timeoutSeconds | toString | quote }}
{{ omit $probe "path" "enabled" | toYaml }}
{{- end }}

{{/* The sidecar container (a map; see leader-sidecar.initContainers / .containers). */}}
{{- define "leader-sidecar.container" -}}
{{- $v := .values -}}
name: leader-sidecar
{{- if $v.image.digest }}
image: {{ printf "%s@%s" $v.image.repository $v.image.digest | quote }}
{{- else }}
image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
{{- end }}
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if $v.native }}
restartPolicy: Always
{{- end }}
args:
  - run
  - --backend=kubernetes
  {{- if not $v.discovery }}
  - {{ printf "--election=%s" (include "leader-sidecar.electionName" .) | quote }}
  {{- end }}
  {{- if $v.leaseName }}
  - {{ printf "--lease-name=%s" $v.leaseName | quote }}
  {{- else if ne $v.leasePrefix "leader-sidecar" }}
  - {{ printf "--lease-prefix=%s" $v.leasePrefix | quote }}
  {{- end }}
  - {{ printf "--lease-duration=%v" $v.leaseDuration | quote }}
  {{- if $v.shards }}
  - {{ printf "--shards=%v" (int $v.shards) | quote }}
  {{- end }}
  {{- with $v.renewDeadline }}
  - {{ printf "--renew-deadline=%v" . | quote }}
  {{- end }}
  {{- with $v.retryPeriod }}
  - {{ printf "--retry-period=%v" . | quote }}
  {{- end }}
  - {{ printf "--shutdown-timeout=%v" $v.shutdownTimeout | quote }}
  - {{ printf "--http-address=127.0.0.1:%v" $v.http.port | quote }}
  {{- if $v.grpc.enabled }}
  - {{ printf "--grpc-address=127.0.0.1:%v" $v.grpc.port | quote }}
  {{- else }}
  - --grpc-address=off
  {{- end }}
  - --log-format=json
  - {{ printf "--log-level=%s" $v.logLevel | quote }}
  {{- if $v.labelPod }}
  - --label-pod
  {{- end }}
  {{- if $v.events }}
  - --events
  {{- end }}
  {{- if $v.metrics.enabled }}
  - {{ printf "--metrics-address=0.0.0.0:%v" $v.metrics.port | quote }}
  {{- end }}
  {{- if $v.apiToken.secretName }}
  - {{ printf "--api-token-file=/var/run/secrets/leader-sidecar/api-token/%s" $v.apiToken.key | quote }}
  {{- if $v.apiToken.reads }}
  - --api-token-reads
  {{- end }}
  {{- end }}
  {{- range $v.extraArgs }}
  - {{ . | quote }}
  {{- end }}
env:
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  - name: POD_UID
    valueFrom:
      fieldRef:
        fieldPath: metadata.uid
  # The pod's revision (a Deployment's ReplicaSet label; empty for other workloads) and whether
  # a leader hands over to a ready replica of a newer revision during a rollout.
  - name: POD_TEMPLATE_HASH
    valueFrom:
      fieldRef:
        fieldPath: metadata.labels['pod-template-hash']
  - name: LEADER_SIDECAR_ROLLOUT_AWARE
    value: {{ $v.rolloutAware | toString | quote }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if $v.metrics.enabled }}
ports:
  - name: metrics
    containerPort: {{ $v.metrics.port }}
    protocol: TCP
{{- end }}
{{- if $v.probes.enabled }}
{{- range $kind := list "startup" "readiness" "liveness" }}
{{- $probe := index $v.probes $kind }}
{{- if $probe.enabled }}
{{ $kind }}Probe:
  {{- include "leader-sidecar.probe" (list $ $probe) | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
{{- if or $v.serviceAccount.tokenOnlyInSidecar $v.tmpVolume $v.apiToken.secretName }}
volumeMounts:
  {{- if $v.serviceAccount.tokenOnlyInSidecar }}
  - name: leader-sidecar-token
    mountPath: /var/run/secrets/kubernetes.io/serviceaccount
    readOnly: true
  {{- end }}
  {{- if $v.tmpVolume }}
  - name: leader-sidecar-tmp
    mountPath: /tmp
  {{- end }}
  {{- if $v.apiToken.secretName }}
  - name: leader-sidecar-api-token
    mountPath: /var/run/secrets/leader-sidecar/api-token
    readOnly: true
  {{- end }}
{{- end }}
{{- end }}

{{/* List entries for the pod's initContainers: the sidecar when native (else nothing). */}}
{{- define "leader-sidecar.initContainers" -}}
{{- if .values.native -}}
- {{ include "leader-sidecar.container" . | indent 2 | trim }}
{{- end -}}
{{- end }}

{{/* List entries for the pod's containers: the sidecar when not native (else nothing). */}}
{{- define "leader-sidecar.containers" -}}
{{- if not .values.native -}}
- {{ include "leader-sidecar.container" . | indent 2 | trim }}
{{- end -}}
{{- end }}

{{/*
List entries for the pod's volumes: the ServiceAccount token, CA and namespace, projected as the
kubelet does for automounted tokens but mounted into the sidecar only; and a small writable /tmp
(the root filesystem is read-only, and the sidecar's CLI looks for a temporary directory).
*/}}
{{- define "leader-sidecar.volumes" -}}
{{- include "leader-sidecar.volumeList" . | trim -}}
{{- end }}

{{- define "leader-sidecar.volumeList" -}}
{{- if .values.serviceAccount.tokenOnlyInSidecar }}
- name: leader-sidecar-token
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: {{ .values.serviceAccount.tokenExpirationSeconds }}
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                fieldPath: metadata.namespace
{{- end }}
{{- if .values.tmpVolume }}
- name: leader-sidecar-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 4Mi
{{- end }}
{{- with .values.apiToken }}
{{- if .secretName }}
{{- /* Mounted as a directory (no subPath), so a rotated Secret reaches the sidecar. */}}
- name: leader-sidecar-api-token
  secret:
    secretName: {{ .secretName | quote }}
    defaultMode: 0444
    items:
      - key: {{ .key | quote }}
        path: {{ .key | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "leader-sidecar.serviceAccount" -}}
{{- if .values.serviceAccount.create }}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "leader-sidecar.serviceAccountName" . }}
  labels:
    {{- include "leader-sidecar.labels" . | nindent 4 }}
  {{- with .values.serviceAccount.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- /* The token is projected into the sidecar alone (leader-sidecar.volumes) or automounted. */}}
automountServiceAccountToken: {{ not .values.serviceAccount.tokenOnlyInSidecar }}
{{- end }}
{{- end }}

{{/*
The Role: only what the sidecar calls. It never lists or deletes: it reads, creates and updates
its one Lease and watches it with a fieldSelector on metadata.name, which RBAC authorizes against
resourceNames.
*/}}
{{- define "leader-sidecar.role" -}}
{{- $v := .values -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ include "leader-sidecar.resourceName" . }}
  labels:
    {{- include "leader-sidecar.labels" . | nindent 4 }}
rules:
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    {{- if $v.rbac.restrictToLease }}
    {{- if $v.shards }}
    {{- $lease := include "leader-sidecar.leaseName" . }}
    # --shards: the shard Leases' names are known from N.
    resourceNames:
      {{- range $i := until (int $v.shards) }}
      - {{ printf "%s-%d" $lease $i | quote }}
      {{- end }}
    {{- else }}
    resourceNames: [{{ include "leader-sidecar.leaseName" . | quote }}]
    {{- end }}
    {{- end }}
    verbs: [get, watch, update]
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    verbs: [create]
  {{- if $v.shards }}
  # --shards: each replica's member Lease (<lease>-m-<hash of the pod name>) is found by label
  # (list, watch), read and renewed (get, update) and deleted on shutdown; its name comes from
  # the pod's, so resourceNames cannot name it.
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    verbs: [get, list, watch, update, delete]
  {{- end }}
  {{- if $v.discovery }}
  - apiGroups: [""]
    resources: [pods]
    verbs: [get]
  - apiGroups: [apps]
    resources: [replicasets]
    verbs: [get]
  {{- end }}
  {{- if $v.labelPod }}
  - apiGroups: [""]
    resources: [pods]
    verbs: [list, patch]
  {{- end }}
  {{- if $v.rolloutAware }}
  # --rollout-aware: this Pod's ReplicaSet and its Deployment's other pods (Ready? revision?).
  - apiGroups: [""]
    resources: [pods]
    verbs: [get, list, watch]
  - apiGroups: [apps]
    resources: [replicasets]
    verbs: [get]
  {{- end }}
  {{- if $v.events }}
  - apiGroups: [events.k8s.io]
    resources: [events]
    verbs: [create]
  {{- end }}
{{- end }}

{{- define "leader-sidecar.roleBinding" -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ include "leader-sidecar.resourceName" . }}
  labels:
    {{- include "leader-sidecar.labels" . | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ include "leader-sidecar.resourceName" . }}
subjects:
  - kind: ServiceAccount
    name: {{ include "leader-sidecar.serviceAccountName" . }}
    namespace: {{ .root.Release.Namespace | quote }}
{{- end }}

{{/* All the sidecar's own objects, as YAML documents: ServiceAccount, Role, RoleBinding. */}}
{{- define "leader-sidecar.resources" -}}
{{- if .values.serviceAccount.create }}
---
{{ include "leader-sidecar.serviceAccount" . }}
{{- end }}
{{- if .values.rbac.create }}
---
{{ include "leader-sidecar.role" . }}
---
{{ include "leader-sidecar.roleBinding" . }}
{{- end }}
{{- end }}
