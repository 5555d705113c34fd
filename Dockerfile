# One image with every binary: pm-gateway, pm-tenant-service, pm-shard, pm-agent, pm, pmctl.
# For builders with a registry; without one, scripts/images.sh builds the same binaries (the
# same cargo command, stripped the same way) into the same layout with podman, and CI builds
# and runs those. k8s/ refers to it as `pipeline-manager`, mapped to
# ghcr.io/pipeline-manager/pm by the kustomize base.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN ./scripts/setup.sh && cargo build --release --locked \
    --bin pm-gateway --bin pm-tenant-service --bin pm-shard --bin pm-agent --bin pm --bin pmctl \
    && cd target/release \
    && strip --strip-debug pm-gateway pm-tenant-service pm-shard pm-agent pm pmctl

FROM docker.io/library/debian:bookworm-slim
# etcdctl (etcd-client) for the etcd backup CronJob and restore Job of k8s/.
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates etcd-client \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pm-gateway /src/target/release/pm-tenant-service \
    /src/target/release/pm-shard /src/target/release/pm-agent /src/target/release/pm \
    /src/target/release/pmctl /usr/local/bin/
ENTRYPOINT ["pm-agent"]
