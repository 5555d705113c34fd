#!/bin/sh
# Restores an etcd snapshot into one member's data directory, as a new cluster of the
# members in INITIAL_CLUSTER (every member is restored from the same snapshot, each under its
# own name). Whatever DATA_DIR held is moved aside, never deleted. k8s/README.md, "Backups",
# runs it for each member with etcd scaled to zero; cluster/tests/etcd.rs runs it against a
# real etcd.
#   etcd-restore.sh SNAPSHOT DATA_DIR NAME INITIAL_CLUSTER PEER_URL
# e.g. etcd-restore.sh /backup/etcd-20261202T000000Z.db /var/lib/etcd/data etcd-0 \
#        etcd-0=http://etcd-0.etcd:2380 http://etcd-0.etcd:2380
set -eu
if [ "$#" -ne 5 ]; then
    echo "usage: etcd-restore.sh SNAPSHOT DATA_DIR NAME INITIAL_CLUSTER PEER_URL" >&2
    exit 2
fi
snapshot=$1 data=$2 name=$3 cluster=$4 peer=$5
export ETCDCTL_API=3
# Refuses a damaged snapshot before anything is moved.
etcdctl --write-out=simple snapshot status "$snapshot"
if [ -e "$data" ]; then
    aside="$data.before-restore-$(date -u +%Y%m%dT%H%M%SZ)"
    mv "$data" "$aside"
    echo "moved the old data to $aside"
fi
etcdctl snapshot restore "$snapshot" --data-dir "$data" --name "$name" \
    --initial-cluster "$cluster" --initial-advertise-peer-urls "$peer" \
    --initial-cluster-token pipeline-manager
echo "restored $snapshot into $data as $name"
