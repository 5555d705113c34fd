//! Two tenant-service replicas over one metadata store, through the generated stubs: a real
//! etcd, and the embedded store `pm dev` uses shared by two servers. Applies of the same
//! pipeline race; every version is written once, in order, and each apply either gets its own
//! version or ABORTED (the conflict code), never a version another apply got. (On etcd the
//! two applies of a round interleave; the embedded store answers each call under one lock,
//! and there they ran one after the other.)

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::Code;
use tonic::transport::Channel;

use pm_cluster::MetadataStore;
use pm_proto::v1::pipeline_service_client::PipelineServiceClient;
use pm_proto::v1::tenant_service_client::TenantServiceClient;
use pm_proto::v1::*;

const APP: &str = "tenants/t/applications/a";
const PIPELINE: &str = "tenants/t/applications/a/pipelines/p";
/// Rounds of two applies at once, one per replica, each of its own spec.
const ROUNDS: usize = 15;

struct Replica {
    tenants: TenantServiceClient<Channel>,
    pipelines: PipelineServiceClient<Channel>,
    _stop: tokio_util::sync::DropGuard,
}

/// A tenant-service on a free loopback port over `store`, stopped when dropped.
async fn replica(store: Arc<dyn MetadataStore>) -> Replica {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(pm_tenant_service::run(
        listener,
        store,
        stop.clone().cancelled_owned(),
    ));
    let channel = pm_proto::client::channel(&endpoint).unwrap();
    Replica {
        tenants: pm_proto::client::tenants(channel.clone()),
        pipelines: pm_proto::client::pipelines(channel),
        _stop: stop.drop_guard(),
    }
}

/// The tenant `t` (through `tenants`) and its application `a` (through `pipelines`).
async fn make_application(
    tenants: &mut TenantServiceClient<Channel>,
    pipelines: &mut PipelineServiceClient<Channel>,
) {
    tenants
        .create_tenant(CreateTenantRequest {
            tenant_id: "t".into(),
            tenant: None,
        })
        .await
        .unwrap();
    pipelines
        .create_application(CreateApplicationRequest {
            parent: "tenants/t".into(),
            application_id: "a".into(),
            application: None,
        })
        .await
        .unwrap();
}

fn apply(command: String) -> ApplyPipelineRequest {
    ApplyPipelineRequest {
        parent: APP.into(),
        pipeline_id: "p".into(),
        source: Some(apply_pipeline_request::Source::SpecDocument(format!(
            "stages: [{{name: s, jobs: [{{name: j, commands: ['{command}']}}]}}]"
        ))),
    }
}

async fn concurrent_applies_get_distinct_versions(store: Arc<dyn MetadataStore>) {
    let mut one = replica(store.clone()).await;
    let mut two = replica(store).await;
    // Made by one replica, seen by the other.
    make_application(&mut one.tenants, &mut two.pipelines).await;
    let seen = one
        .pipelines
        .get_application(GetApplicationRequest { name: APP.into() })
        .await
        .unwrap();
    assert_eq!(seen.into_inner().name, APP);

    // Version -> the spec its apply was answered with.
    let mut versions: BTreeMap<u64, Option<PipelineSpec>> = BTreeMap::new();
    let mut aborted = 0;
    for round in 0..ROUNDS {
        let (a, b) = tokio::join!(
            one.pipelines
                .apply_pipeline(apply(format!("echo one {round}"))),
            two.pipelines
                .apply_pipeline(apply(format!("echo two {round}"))),
        );
        let mut won = 0;
        for outcome in [a, b] {
            match outcome {
                Ok(applied) => {
                    let applied = applied.into_inner();
                    let earlier = versions.insert(applied.version, applied.spec);
                    assert!(earlier.is_none(), "version {} given twice", applied.version);
                    won += 1;
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::Aborted, "a lost race: {e:?}");
                    aborted += 1;
                }
            }
        }
        assert!(won >= 1, "round {round}: one apply of two always lands");
    }
    let applied: Vec<u64> = versions.keys().copied().collect();
    let expected: Vec<u64> = (1..=applied.len() as u64).collect();
    assert_eq!(applied, expected, "versions in order, none skipped");
    println!(
        "{} versions over {ROUNDS} rounds of two concurrent applies; {aborted} ABORTED",
        applied.len()
    );
    // Each version reads back, from either replica, as its apply answered; the latest is the
    // last version.
    for (version, spec) in &versions {
        for replica in [&mut one, &mut two] {
            let read = replica
                .pipelines
                .get_pipeline(GetPipelineRequest {
                    name: PIPELINE.into(),
                    version: *version,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(&read.spec, spec, "version {version}");
        }
    }
    let latest = two
        .pipelines
        .get_pipeline(GetPipelineRequest {
            name: PIPELINE.into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.version, *versions.keys().last().unwrap());
}

#[tokio::test]
async fn replicas_on_etcd_race_applies_and_no_version_is_given_twice() {
    let etcd = pm_cluster::testing::Etcd::start();
    let store = pm_cluster::etcd::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .unwrap();
    concurrent_applies_get_distinct_versions(Arc::new(store)).await;
}

#[tokio::test]
async fn replicas_on_the_embedded_store_give_each_apply_its_own_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = pm_cluster::metadata::EmbeddedStore::open(dir.path().join("metadata")).unwrap();
    concurrent_applies_get_distinct_versions(Arc::new(store)).await;
}

/// An apply cut between its two writes (by older code, which wrote the version record and
/// then the latest pointer) left a version record nothing points to. The next apply takes
/// that version over instead of failing on it forever. And `put_all` writes all or nothing.
async fn a_version_left_by_a_cut_apply_is_taken_over(store: Arc<dyn MetadataStore>) {
    use pm_cluster::metadata::Expect;
    use prost::Message;

    let mut one = replica(store.clone()).await;
    make_application(&mut one.tenants, &mut one.pipelines).await;
    let first = one.pipelines.apply_pipeline(apply("echo 1".into())).await;
    assert_eq!(first.unwrap().into_inner().version, 1);

    // What the cut apply wrote: version 2, and no more.
    let name = pm_proto::names::PipelineName::parse(PIPELINE).unwrap();
    let orphan = Pipeline {
        name: PIPELINE.into(),
        version: 2,
        ..Pipeline::default()
    };
    let key = pm_tenant_service::keys::pipeline_version(&name, 2);
    store
        .put(&key, orphan.encode_to_vec(), Expect::Absent)
        .await
        .unwrap();

    let second = one
        .pipelines
        .apply_pipeline(apply("echo 2".into()))
        .await
        .expect("the apply after a cut one lands")
        .into_inner();
    assert_eq!(second.version, 2);
    let read = one
        .pipelines
        .get_pipeline(GetPipelineRequest {
            name: PIPELINE.into(),
            version: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        read.spec, second.spec,
        "version 2 is the apply's, not the cut one's"
    );

    // All or nothing: one failed expectation writes neither key.
    let latest = pm_tenant_service::keys::pipeline(&name);
    let refused = store
        .put_all(vec![
            ("/pm/test/new".into(), b"x".to_vec(), Expect::Absent),
            (latest.clone(), b"y".to_vec(), Expect::Absent),
        ])
        .await;
    match refused {
        Err(pm_cluster::Error::Conflict { key, .. }) => assert_eq!(key, latest),
        other => panic!("expected a conflict on {latest}: {other:?}"),
    }
    assert!(store.get("/pm/test/new").await.unwrap().is_none());
}

#[tokio::test]
async fn on_etcd_an_apply_after_a_cut_one_lands() {
    let etcd = pm_cluster::testing::Etcd::start();
    let store = pm_cluster::etcd::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .unwrap();
    a_version_left_by_a_cut_apply_is_taken_over(Arc::new(store)).await;
}

#[tokio::test]
async fn on_the_embedded_store_an_apply_after_a_cut_one_lands() {
    let dir = tempfile::tempdir().unwrap();
    let store = pm_cluster::metadata::EmbeddedStore::open(dir.path().join("metadata")).unwrap();
    a_version_left_by_a_cut_apply_is_taken_over(Arc::new(store)).await;
}
