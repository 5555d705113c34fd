#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need, builds,
# runs. This is the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# protox (etcd-client's protoc), etcd for the cluster tests, wget and tesseract for the
# sample pipeline, promtool, podman for the pipeline pod.
./scripts/setup.sh --test

# CI runs in a fresh clone on a machine that may keep an earlier build: share its target dir.
if [ -n "${CI:-}" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
    export CARGO_TARGET_DIR="$HOME/.cache/pipeline-manager/target"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
# The Kubernetes manifests: every overlay rendered and validated against the schemas.
./scripts/check-k8s.sh
# The web console: its bundle and generated clients rebuilt from web/ must equal the committed
# ones the gateway embeds, and its TypeScript must type-check.
(cd web && npm run --silent build >/dev/null && npm run --silent check)
if ! git diff --quiet -- web/dist web/src/gen; then
    git diff --stat -- web/dist web/src/gen
    echo "web/dist or web/src/gen differ from a fresh build: run (cd web && npm run build) and commit them" >&2
    exit 1
fi
# The multi-process tests start the workspace's binaries (pm-shard, pm-gateway,
# pm-tenant-service, pm-agent); cargo builds only those of packages with tests of their own.
cargo build --workspace --bins
# The Raspberry Pi test (cli/tests/e2e/pi.rs) runs this agent under qemu-user; the 32-bit
# build is checked (types differ there: rlim_t, usize).
cargo build --target aarch64-unknown-linux-gnu -p pm-agent --bin pm-agent
cargo check --target armv7-unknown-linux-gnueabihf -p pm-agent -p pm-cli --bins
# The images the pipeline pod test (cli/tests/e2e/pod.rs) plays under podman; where podman
# cannot run a container, images.sh says why and the test skips.
./scripts/images.sh || [ $? -eq 3 ]
cargo nextest run --workspace --no-fail-fast
