#!/usr/bin/env bash
# Builds the container images with podman, offline (no registry needed):
# - localhost/pipeline-manager:VERSION: every binary (pm-gateway, pm-tenant-service, pm-shard,
#   pm-agent, pm, pmctl), from the same `cargo build` the Dockerfile runs, stripped;
# - the example executors, each with pm-agent for `pm-agent exec-server` (its entrypoint):
#   localhost/pm-exec-wget:VERSION (wget), localhost/pm-exec-tesseract:VERSION (tesseract
#   with English), localhost/pm-exec-store:VERSION (a stand-in for an object-store client:
#   `mc cp SRC ALIAS/BUCKET/KEY` copies into a mounted directory, see below).
# Their base is PM_BASE_IMAGE when set (e.g. docker.io/library/debian:bookworm-slim where a
# registry is reachable); else localhost/pm-base:bookworm, made once by debootstrap from the
# Debian mirror apt uses here, then `podman import` (~40 s). Packages come from that mirror
# (`podman build --network host`). Prints each image's size at the end.
# Needs podman and debootstrap: `./scripts/setup.sh --containers`. Exits 3, building only the
# base, where podman cannot run a container.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
target=${CARGO_TARGET_DIR:-target}
bins=(pm-gateway pm-tenant-service pm-shard pm-agent pm pmctl)
bin_args=()
for b in "${bins[@]}"; do bin_args+=(--bin "$b"); done
cargo build --release --locked "${bin_args[@]}"

base=${PM_BASE_IMAGE:-localhost/pm-base:bookworm}
if ! podman image exists "$base"; then
    if [ "$base" != localhost/pm-base:bookworm ]; then
        podman pull "$base"
    else
        # The mirror apt already uses (deb822 or one-line sources), else Debian's own.
        mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\/*\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
        mirror=${mirror:-$(sed -n 's/^deb \(http[^ ]*debian\/*\) bookworm main.*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n 1)}
        mirror=${mirror:-http://deb.debian.org/debian}
        root=$(mktemp -d)
        trap 'rm -rf "$root"' EXIT
        echo "images: debootstrap bookworm (minbase) from $mirror" >&2
        debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -c . | podman import \
            --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD=["/bin/bash"]' - "$base" >/dev/null
        rm -rf "$root"
        trap - EXIT
    fi
fi

# Where podman cannot run a container at all (exit 3), nothing more is built: the test command
# goes on, and the pod test says why it skips.
if ! why=$(podman run --rm --network host "$base" true 2>&1); then
    echo "images: podman cannot run containers here: $why" >&2
    exit 3
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/bin"
for b in "${bins[@]}"; do
    # Release builds keep line tables for profiles; images do not need them.
    strip --strip-debug -o "$context/bin/$b" "$target/release/$b"
done

build() { # image, Containerfile (stdin)
    podman build --quiet --network host --build-arg "BASE=$base" -t "$1" -f - "$context" >/dev/null
}

# With etcdctl (Debian's etcd-client, 17 MB; the binary alone, not apt's caches) for the etcd
# backup CronJob and restore Job of k8s/.
build "localhost/pipeline-manager:$version" <<'EOF'
ARG BASE
FROM $BASE AS etcdctl
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    etcd-client >/dev/null
FROM $BASE
COPY --from=etcdctl /usr/bin/etcdctl /usr/local/bin/etcdctl
COPY bin/ /usr/local/bin/
ENTRYPOINT ["pm-agent"]
EOF

# One layer of packages per executor (cached while the base stays), then pm-agent.
build "localhost/pm-exec-wget:$version" <<'EOF'
ARG BASE
FROM $BASE
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    wget ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*
COPY bin/pm-agent /usr/local/bin/pm-agent
ENTRYPOINT ["pm-agent", "exec-server"]
EOF

build "localhost/pm-exec-tesseract:$version" <<'EOF'
ARG BASE
FROM $BASE
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    tesseract-ocr tesseract-ocr-eng >/dev/null && rm -rf /var/lib/apt/lists/*
COPY bin/pm-agent /usr/local/bin/pm-agent
ENTRYPOINT ["pm-agent", "exec-server"]
EOF

# A stand-in for MinIO's `mc` where no object store runs: `mc cp SRC ALIAS/BUCKET/KEY`
# copies SRC to $PM_STORE_DIR/BUCKET/KEY (default /store, a volume of the pod). Nothing else
# of mc's is there.
cat > "$context/mc" <<'EOF'
#!/bin/sh
set -eu
if [ "$#" -ne 3 ] || [ "$1" != cp ]; then
    echo "mc (pipeline-manager's stand-in): only 'mc cp SRC ALIAS/BUCKET/KEY' is supported" >&2
    exit 2
fi
key=${3#*/}
case "$key" in
    "$3" | "" | /* | *..*) echo "mc: $3 is not ALIAS/BUCKET/KEY" >&2; exit 2 ;;
esac
dest="${PM_STORE_DIR:-/store}/$key"
mkdir -p "$(dirname "$dest")"
cp "$2" "$dest"
echo "copied $2 to $dest"
EOF
chmod 0755 "$context/mc"
build "localhost/pm-exec-store:$version" <<'EOF'
ARG BASE
FROM $BASE
COPY mc /usr/local/bin/mc
COPY bin/pm-agent /usr/local/bin/pm-agent
ENTRYPOINT ["pm-agent", "exec-server"]
EOF

for image in pipeline-manager pm-exec-wget pm-exec-tesseract pm-exec-store; do
    size=$(podman image inspect --format '{{.Size}}' "localhost/$image:$version")
    echo "localhost/$image:$version $((size / 1000000)) MB"
done
