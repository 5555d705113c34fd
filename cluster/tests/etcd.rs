//! The etcd implementations against a real etcd started for the test.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use pm_cluster::testing::{Etcd, check_store_contract};
use pm_cluster::{EtcdStore, Member, Membership, Registration};

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
