//! The etcd implementations against a real etcd started for the test.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use pm_cluster::testing::{Etcd, check_store_contract};
use pm_cluster::{EtcdStore, Expect, Member, Membership, MetadataStore, Registration};

fn member(id: &str) -> Member {
    Member {
        id: id.into(),
        address: format!("http://{id}:1"),
        started_at: 1,
    }
}

#[tokio::test]
async fn etcd_store_keeps_the_metadata_contract() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .unwrap();
    check_store_contract(&store).await;
}

#[tokio::test]
async fn shards_join_leave_and_expire_and_an_outage_keeps_the_last_ring() {
    let etcd = Etcd::start();
    let endpoints = [etcd.endpoint.clone()];
    let client = pm_cluster::etcd::connect(&endpoints).await.unwrap();
    let cancel = CancellationToken::new();
    let view = Membership::watch(client.clone(), cancel.clone());
    let ids = |view: &Membership| -> Vec<String> {
        view.ring().members().map(|m| m.id.clone()).collect()
    };
    let wait = Duration::from_secs(10);

    let a = Registration::register(client.clone(), member("a"), Duration::from_secs(5))
        .await
        .unwrap();
    let _b = Registration::register(client.clone(), member("b"), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        view.wait_for(wait, |r| r.len() == 2).await,
        "{:?}",
        ids(&view)
    );
    assert!(view.connected());
    let joined = view.ring().revision;

    // Leaving revokes the lease: the key goes at once, long before the 5 s TTL.
    a.leave().await.unwrap();
    assert!(
        view.wait_for(Duration::from_secs(2), |r| r.len() == 1)
            .await
    );
    assert_eq!(ids(&view), ["b"]);
    assert!(view.ring().revision > joined);

    // Kept alive past its TTL: still there.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(ids(&view), ["b"]);

    // A registration that stops renewing (a crashed shard) expires after its TTL.
    let c = Registration::register(client.clone(), member("c"), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(view.wait_for(wait, |r| r.len() == 2).await);
    // Dropped without leaving: renewals stop, as when the process is killed.
    drop(c);
    assert!(view.wait_for(wait, |r| r.len() == 1).await);
    assert_eq!(ids(&view), ["b"]);

    // etcd gone: the view keeps the last ring and says it is not connected.
    let before = view.ring();
    drop(etcd);
    let mut connected = view.connected_changes();
    tokio::time::timeout(wait, connected.wait_for(|c| !*c))
        .await
        .expect("the view notices etcd is gone")
        .unwrap();
    assert_eq!(view.ring(), before);
    cancel.cancel();
}

/// Runs one of k8s/base's etcd scripts (the ones the backup CronJob and the documented
/// restore run) with `sh`, as the image does; returns its output, or panics with it.
fn script(name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../k8s/base")
        .join(name);
    let out = std::process::Command::new("sh")
        .arg(&path)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("sh {}: {e}", path.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?}: {text}");
    text
}

/// The backup CronJob's script and the documented restore, against a real etcd and
/// etcdctl: snapshots are kept to their number, and a wiped member restored from the newest
/// one has every key it held, and none written after it.
#[tokio::test]
async fn a_snapshot_restores_a_wiped_etcd() {
    let mut etcd = Etcd::start();
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .unwrap();
    let writes = (0..100)
        .map(|i| {
            (
                format!("/pm/v1/tenants/t{i:03}"),
                format!("tenant {i}").into_bytes(),
                Expect::Absent,
            )
        })
        .collect();
    store.put_all(writes).await.unwrap();

    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().to_str().unwrap();
    let env = [
        ("ETCDCTL_ENDPOINTS", etcd.endpoint.as_str()),
        ("PM_BACKUP_DIR", dir),
        ("PM_BACKUP_KEEP", "2"),
    ];
    let listed = || {
        let mut names: Vec<String> = std::fs::read_dir(backups.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let out = script("etcd-backup.sh", &[], &env);
    assert!(out.contains("saved "), "{out}");
    let first = listed();
    assert_eq!(first.len(), 1, "{first:?}");
    // Two older snapshots (copies, named by an older time); the next run keeps the newest two.
    for old in ["etcd-20200101T000000Z.db", "etcd-20200102T000000Z.db"] {
        std::fs::copy(backups.path().join(&first[0]), backups.path().join(old)).unwrap();
    }
    let out = script("etcd-backup.sh", &[], &env);
    assert!(
        out.contains("removed ") && out.contains("etcd-20200101T000000Z.db"),
        "{out}"
    );
    let kept = listed();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        !kept.contains(&"etcd-20200101T000000Z.db".to_owned()),
        "{kept:?}"
    );
    assert!(kept.iter().all(|f| !f.ends_with(".part")), "{kept:?}");
    let newest = backups.path().join(kept.last().unwrap());

    // Written after the snapshot: a restore must not have it.
    store
        .put("/pm/v1/tenants/late", b"late".to_vec(), Expect::Absent)
        .await
        .unwrap();
    drop(store);

    // The member is lost with its disk.
    etcd.kill();
    let data = etcd.data_dir().to_owned();
    std::fs::remove_dir_all(&data).unwrap();

    let (client, peer) = (
        pm_cluster::testing::free_port(),
        pm_cluster::testing::free_port(),
    );
    let peer_url = format!("http://127.0.0.1:{peer}");
    let member = pm_cluster::testing::MEMBER;
    // The documented restore: the newest snapshot into the member's data dir, as a
    // one-member cluster on the ports it starts on next.
    let restore = || {
        script(
            "etcd-restore.sh",
            &[
                newest.to_str().unwrap(),
                data.to_str().unwrap(),
                member,
                &format!("{member}={peer_url}"),
                &peer_url,
            ],
            &[],
        )
    };
    let out = restore();
    assert!(out.contains("restored "), "{out}");
    let restored = Etcd::start_on(&data, client, peer);
    let store = EtcdStore::connect(std::slice::from_ref(&restored.endpoint))
        .await
        .unwrap();
    assert_eq!(store.count("/pm/v1/tenants/").await.unwrap(), 100);
    let t7 = store.get("/pm/v1/tenants/t007").await.unwrap().unwrap();
    assert_eq!(t7.value, b"tenant 7");
    assert!(store.get("/pm/v1/tenants/late").await.unwrap().is_none());
    // The restored member takes writes.
    store
        .put("/pm/v1/tenants/after", b"after".to_vec(), Expect::Absent)
        .await
        .unwrap();

    // A restore over a data dir that holds something moves it aside, never deletes it.
    drop(restored);
    let out = restore();
    assert!(out.contains("moved the old data to "), "{out}");
    let aside = std::fs::read_dir(data.parent().unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".before-restore-")
        })
        .count();
    assert_eq!(aside, 1);
}
