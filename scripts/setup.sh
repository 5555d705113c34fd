#!/usr/bin/env bash
# Installs what building and testing need beyond cargo, once per machine; later runs are no-ops.
# - protox's binary in .tools/, the `protoc` etcd-client's build script runs (.cargo/config.toml);
# - an etcd server for the cluster tests (Debian's etcd-server, /usr/bin/etcd), unless
#   PM_ETCD_BIN names one already, and etcdctl (Debian's etcd-client), which the backup and
#   restore scripts of k8s/base run in their test;
# - wget and tesseract (Debian's tesseract-ocr, with English), which the sample OCR pipeline
#   runs, and curl;
# - make and a C compiler, which build jemalloc (the servers' allocator on x86_64);
# - promtool (Debian's prometheus), which lints a live scrape in the metrics test;
# - for the Raspberry Pi builds: Rust's aarch64 and armv7 Linux targets, Debian's cross
#   compilers for them (gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf, with their libcs),
#   and qemu-user to run the aarch64 agent in a test;
# - for the web console's tests: Node and npm, Debian's chromium (driven headless by
#   puppeteer-core; no browser is downloaded), and web/'s npm packages at their locked
#   versions (`npm ci`);
# - with --containers (and --test): podman, runc and debootstrap, which scripts/images.sh
#   and the pod test use, with a system-wide /etc/containers/containers.conf that works on
#   hosts like this project's: the runc runtime (crun fails on their cgroups) and no default
#   ulimits (setting RLIMIT_NOFILE is not permitted there). An existing containers.conf not
#   written here is left alone, with a warning.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .tools/bin/protox ]; then
    cargo install --locked --quiet protox --version 0.10.0 --features bin --root .tools
fi

packages=()
command -v curl >/dev/null 2>&1 || packages+=(curl)
command -v make >/dev/null 2>&1 || packages+=(make)
command -v cc >/dev/null 2>&1 || packages+=(gcc)
command -v wget >/dev/null 2>&1 || packages+=(wget)
command -v tesseract >/dev/null 2>&1 || packages+=(tesseract-ocr)
if [ "${1:-}" = "--test" ] && [ -z "${PM_ETCD_BIN:-}" ] && [ ! -x /usr/bin/etcd ]; then
    packages+=(etcd-server)
fi
if [ "${1:-}" = "--test" ] && ! command -v etcdctl >/dev/null 2>&1; then
    packages+=(etcd-client)
fi
if [ "${1:-}" = "--test" ] && [ -z "${PM_PROMTOOL_BIN:-}" ] && ! command -v promtool >/dev/null 2>&1; then
    packages+=(prometheus)
fi
if [ "${1:-}" = "--test" ]; then
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || packages+=(gcc-aarch64-linux-gnu)
    command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || packages+=(gcc-arm-linux-gnueabihf)
    command -v qemu-aarch64 >/dev/null 2>&1 || packages+=(qemu-user)
    command -v npm >/dev/null 2>&1 || packages+=(npm)
    command -v chromium >/dev/null 2>&1 || packages+=(chromium)
    for target in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
        if ! rustup target list --installed | grep -qx "$target"; then
            rustup target add "$target"
        fi
    done
fi
containers=
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--containers" ]; then
    containers=1
    command -v podman >/dev/null 2>&1 || packages+=(podman)
    command -v runc >/dev/null 2>&1 || packages+=(runc)
    command -v debootstrap >/dev/null 2>&1 || packages+=(debootstrap)
fi
if [ ${#packages[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
if [ "${1:-}" = "--test" ] && { [ ! -d web/node_modules ] || [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; }; then
    (cd web && npm ci --silent --no-audit --no-fund)
fi
if [ -n "$containers" ]; then
    conf=/etc/containers/containers.conf
    marker='# Written by pipeline-manager scripts/setup.sh'
    if [ ! -e "$conf" ] || head -n 1 "$conf" | grep -qx "$marker"; then
        mkdir -p /etc/containers
        printf '%s\n[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' "$marker" > "$conf"
    elif ! grep -q '^runtime = "runc"' "$conf"; then
        echo "setup: $conf is not ours: if podman fails to start containers, set runtime = \"runc\" under [engine] and default_ulimits = [] under [containers]" >&2
    fi
fi
