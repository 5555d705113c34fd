//! The gateway's pipeline cache follows etcd: a new version applied elsewhere (here straight
//! through tenant-service, as another gateway would) replaces the cached one long before
//! the cache's own expiry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use pm_cluster::testing::Etcd;
use pm_gateway::pipelines::{PipelineCache, WATCHED_TTL};
use pm_proto::names::PipelineName;
use pm_proto::v1::{
    ApplyPipelineRequest, CreateApplicationRequest, CreateTenantRequest, Job, PipelineSpec, Stage,
    apply_pipeline_request,
};

fn spec(command: &str) -> PipelineSpec {
    PipelineSpec {
        stages: vec![Stage {
            name: "s".into(),
            jobs: vec![Job {
                name: "j".into(),
                executor: "host".into(),
                commands: vec![command.into()],
                ..Job::default()
            }],
            priority: None,
        }],
        ..PipelineSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_applied_elsewhere_replaces_the_cached_one_at_once() {
    let etcd = Etcd::start();
    let endpoints = [etcd.endpoint.clone()];
    let store = Arc::new(pm_cluster::EtcdStore::connect(&endpoints).await.unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(pm_tenant_service::run(
        listener,
        store,
        stop.clone().cancelled_owned(),
    ));
    let channel = pm_proto::client::channel(&endpoint).unwrap();
    let mut config = pm_proto::client::pipelines(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while pm_proto::client::tenants(channel.clone())
        .create_tenant(CreateTenantRequest {
            tenant_id: "t".into(),
            tenant: None,
        })
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "tenant-service not serving");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    config
        .create_application(CreateApplicationRequest {
            parent: "tenants/t".into(),
            application_id: "a".into(),
            application: None,
        })
        .await
        .unwrap();
    let apply = |command: &str| ApplyPipelineRequest {
        parent: "tenants/t/applications/a".into(),
        pipeline_id: "p".into(),
        source: Some(apply_pipeline_request::Source::Spec(spec(command))),
    };
    config.apply_pipeline(apply("echo one")).await.unwrap();

    let cache = Arc::new(PipelineCache::new(
        config.clone(),
        pm_proto::client::tenants(channel.clone()),
    ));
    let etcd_client = pm_cluster::etcd::connect(&endpoints).await.unwrap();
    cache.follow(etcd_client, stop.clone());
    let name = PipelineName::parse("tenants/t/applications/a/pipelines/p").unwrap();
    let version = |p: &pm_proto::v1::Pipeline| p.version;
    // Once the watch is up, entries live WATCHED_TTL: only the watch can replace one sooner.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cache.watching() {
        assert!(
            Instant::now() < deadline,
            "the pipeline watch did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = version(&cache.get(&name).await.unwrap().pipeline);

    config.apply_pipeline(apply("echo two")).await.unwrap();
    let deadline = Instant::now() + WATCHED_TTL / 4;
    loop {
        let now = version(&cache.get(&name).await.unwrap().pipeline);
        if now > first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache still serves version {now} {:?} after the apply",
            WATCHED_TTL / 4
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
}
