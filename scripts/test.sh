#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need, builds,
# runs. This is the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests run commands with sh and fetch file:// URLs with curl (the sample pipeline).
missing=()
for tool in curl sh; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq curl
fi

# CI runs in a fresh clone on a machine that may keep an earlier build: share its target dir.
if [ -n "${CI:-}" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
    export CARGO_TARGET_DIR="$HOME/.cache/pipeline-manager/target"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --no-fail-fast
