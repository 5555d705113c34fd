#!/bin/sh
# Saves a snapshot of etcd as $PM_BACKUP_DIR/etcd-<UTC time>.db and keeps the newest
# $PM_BACKUP_KEEP of them. Run by the CronJob `etcd-backup` (etcd-backup.yaml), and by the
# test that restores one (cluster/tests/etcd.rs). ETCDCTL_ENDPOINTS names one endpoint: a
# snapshot comes from one member.
set -eu
dir=${PM_BACKUP_DIR:-/backup}
keep=${PM_BACKUP_KEEP:-28}
: "${ETCDCTL_ENDPOINTS:?set ETCDCTL_ENDPOINTS to one etcd client URL}"
export ETCDCTL_API=3
snapshot="$dir/etcd-$(date -u +%Y%m%dT%H%M%SZ).db"
# Written aside and renamed once whole and checked: a snapshot cut short never looks like one.
etcdctl snapshot save "$snapshot.part" >/dev/null
etcdctl --write-out=simple snapshot status "$snapshot.part"
mv "$snapshot.part" "$snapshot"
echo "saved $snapshot ($(wc -c < "$snapshot") bytes)"
# The names sort by time; all but the newest $keep go.
ls -1 "$dir" | grep -E '^etcd-[0-9]{8}T[0-9]{6}Z\.db$' | sort | head -n "-$keep" | while read -r old; do
    rm -f "$dir/$old"
    echo "removed $dir/$old"
done
