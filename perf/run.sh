#!/usr/bin/env bash
# Builds the release binaries, then runs every benchmark scenario against them (about 3
# minutes; `--quick` about 1). Figures go to stdout and perf/results/latest.json; the last
# line is `summary: submit_tps=N submit_p99_ms=X dispatch_p99_ms=X cycle_tps=N batch_tps=N`.
# Extra arguments pass to pm-perf (`--quick`, scenario names). The `scaling` scenario starts
# an etcd (/usr/bin/etcd, or PM_ETCD_BIN; `./scripts/setup.sh --test` installs one).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --quiet -p pm-scheduler-shard -p pm-gateway -p pm-tenant-service -p pm-agent -p pm-perf
mkdir -p perf/results
exec "$target/release/pm-perf" --bin-dir "$target/release" --json perf/results/latest.json "$@"
