#!/usr/bin/env bash
# The mutation score of the core modules (docs/testing.md): cargo-mutants changes one
# operator, condition or return value at a time and runs the package's tests against each
# change; a change no test notices is "missed". A measurement, not part of CI: on this
# project's 2-core machine the shard's modules take over an hour.
#
#   ./scripts/mutants.sh           every core module
#   ./scripts/mutants.sh shard     the journal and the lease table, against the shard's tests
#   ./scripts/mutants.sh shard-lib task states, queue and fairness, ownership, against the
#                                  shard's library tests (seconds a mutant, not minutes)
#   ./scripts/mutants.sh cluster   the ring
#   ./scripts/mutants.sh spec      the spec templates
#
# Results go to target/mutants/<part>/mutants.out (caught.txt, missed.txt, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test >/dev/null
if ! cargo mutants --version >/dev/null 2>&1; then
    cargo install --locked cargo-mutants
fi
root=$(pwd)
# A target dir of its own (mutated builds must not replace the workspace's binaries), no
# debug info (links faster), and incremental builds (each mutant changes one file).
export PROTOC="$root/.tools/bin/protox"
export CARGO_TARGET_DIR="${MUTANTS_TARGET_DIR:-$root/target/mutants/target}"
export CARGO_INCREMENTAL=1 CARGO_PROFILE_DEV_DEBUG=0
out="$root/target/mutants"
mkdir -p "$out"

shard() {
    # The shard's process tests start the other binaries (pm-agent), unmutated.
    cargo build --workspace --bins
    # The cluster test (etcd, ~40 s) is left out: it tests the ring's movement, which the
    # faster tests of these modules cover.
    cargo mutants --test-tool nextest -o "$out/shard" --timeout 120 \
        -f scheduler-shard/src/lease.rs -f scheduler-shard/src/journal.rs \
        -- -E 'not test(shards_join_leave_and_crash_under_load)' || true
}
shard-lib() {
    cargo mutants --test-tool nextest -o "$out/shard-lib" --timeout 60 \
        -f scheduler-shard/src/task.rs -f scheduler-shard/src/queue.rs \
        -f scheduler-shard/src/ownership.rs -- --lib || true
}
cluster() {
    cargo mutants --test-tool nextest -o "$out/cluster" --timeout 120 \
        -f cluster/src/ring.rs || true
}
spec() {
    cargo mutants --test-tool nextest -o "$out/spec" --timeout 120 \
        -f spec/src/template.rs || true
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(shard shard-lib cluster spec)
for part in "${parts[@]}"; do
    "$part"
    echo "$part: caught $(wc -l <"$out/$part/mutants.out/caught.txt"), missed $(wc -l <"$out/$part/mutants.out/missed.txt"), timeout $(wc -l <"$out/$part/mutants.out/timeout.txt"), unviable $(wc -l <"$out/$part/mutants.out/unviable.txt")"
done
