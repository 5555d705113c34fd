//! Ring ownership on real shard servers in one ring on a real etcd: a shard answers for the
//! pipelines it owns and refuses the others with the owner and its ring revision; `Adopt`
//! validates, persists and is idempotent; and with etcd gone a shard keeps serving the ring
//! it knows while its health says so.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Code;

mod common;
use common::item;

use pm_cluster::Member;
use pm_cluster::testing::Etcd;
use pm_proto::internal::v1::{AdoptRequest, EnqueueRequest, HandoffTask, StoredTask};
use pm_proto::status::NotOwner;
use pm_proto::v1::{GetTaskRequest, ListTasksRequest, PipelineSpec, Task, TaskState};
use pm_scheduler_shard::{Cluster, Ownership};

struct Shard {
    endpoint: String,
    ownership: std::sync::Arc<Ownership>,
    _dir: tempfile::TempDir,
}

async fn shard(etcd: &str, id: &str, stop: &CancellationToken) -> Shard {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let scheduler =
        pm_scheduler_shard::open(pm_scheduler_shard::Options::default(), Some(dir.path())).unwrap();
    let me = Member {
        id: id.into(),
        address: endpoint.clone(),
        started_at: 1,
    };
    let cluster = Cluster::join(
        &[etcd.to_owned()],
        me,
        Duration::from_secs(2),
        Some(Duration::from_secs(5)),
        stop.clone(),
    )
    .await
    .unwrap();
    let ownership = cluster.ownership.clone();
    tokio::spawn(pm_scheduler_shard::serve(
        listener,
        scheduler,
        cluster,
        stop.clone().cancelled_owned(),
    ));
    Shard {
        endpoint,
        ownership,
        _dir: dir,
    }
}

fn spec() -> PipelineSpec {
    common::spec(vec!["true".into()])
}

fn client(
    endpoint: &str,
) -> pm_proto::internal::v1::shard_service_client::ShardServiceClient<tonic::transport::Channel> {
    pm_proto::client::shard(pm_proto::client::channel(endpoint).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_serve_what_they_own_refuse_the_rest_and_survive_an_etcd_outage() {
    let etcd = Etcd::start();
    let stop = CancellationToken::new();
    let a = shard(&etcd.endpoint, "a", &stop).await;
    let b = shard(&etcd.endpoint, "b", &stop).await;
    for s in [&a, &b] {
        assert!(
            s.ownership
                .membership()
                .wait_for(Duration::from_secs(10), |r| r.len() == 2)
                .await
        );
    }
    // A pipeline of a's and one of b's, by the ring both see.
    let ring = a.ownership.ring();
    let owned_by = |id: &str| {
        (0..100)
            .map(|i| format!("tenants/t/applications/app/pipelines/p{i}"))
            .find(|p| {
                let key =
                    pm_cluster::RingKey::whole(pm_proto::names::PipelineName::parse(p).unwrap());
                ring.owner(&key).unwrap().id == id
            })
            .unwrap()
    };
    let (pa, pb) = (owned_by("a"), owned_by("b"));

    // The owner takes the submit.
    let mut ca = client(&a.endpoint);
    let task = common::enqueue_acknowledged(&mut ca, item(&pa)).await;

    // The other shard refuses every call on it, naming the owner and its ring revision.
    let mut cb = client(&b.endpoint);
    let refusals = [
        cb.enqueue(EnqueueRequest {
            tasks: vec![item(&pa)],
            ..Default::default()
        })
        .await
        .map(|_| ()),
        cb.get_task(GetTaskRequest {
            name: task.name.clone(),
        })
        .await
        .map(|_| ()),
        cb.list_tasks(ListTasksRequest {
            parent: pa.clone(),
            ..ListTasksRequest::default()
        })
        .await
        .map(|_| ()),
    ];
    for r in refusals {
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let view = NotOwner::from_status(&status).expect("owner metadata");
        assert_eq!(view.owner, Some(("a".into(), a.endpoint.clone())));
        assert_eq!(view.revision, ring.revision);
    }
    // So does the agent stream of a pipeline it does not own.
    let (_tx, answer) = common::connect_agent(&b.endpoint, &pa).await;
    let status = answer.expect_err("refused");
    assert!(NotOwner::from_status(&status).is_some(), "{status:?}");

    // Adopt: b takes a task of its own pipeline, once; a spec it is not given, or a name that
    // is not a task's (ids are 32 hex digits), is refused by field; a task of a pipeline b
    // does not own is refused with the owner.
    const T1: &str = "0193aaaa00007000800000000000a001";
    let refusal = |status: &tonic::Status| {
        let field = pm_proto::status::violated_field(status).unwrap_or_default();
        (status.code(), field)
    };
    let stored = |pipeline: &str, id: &str, spec_id: Vec<u8>| HandoffTask {
        stored: Some(StoredTask {
            task: Some(Task {
                name: format!("{pipeline}/tasks/{id}"),
                pipeline: pipeline.into(),
                state: TaskState::Ready as i32,
                priority: 10,
                ..Task::default()
            }),
            spec_id,
            client_priority: 10,
            seq: 1,
            lease_id: String::new(),
        }),
        lease_remaining_ms: 0,
    };
    let spec_id = pm_spec::spec_id(&spec()).to_vec();
    let adopt = |tasks: Vec<HandoffTask>, specs: Vec<PipelineSpec>| AdoptRequest {
        from_shard: "a".into(),
        ring_revision: ring.revision,
        specs,
        tasks,
    };
    let first = cb
        .adopt(adopt(vec![stored(&pb, T1, spec_id.clone())], vec![spec()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.adopted, first.already_held), (1, 0));
    let again = cb
        .adopt(adopt(vec![stored(&pb, T1, spec_id.clone())], vec![spec()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.adopted, again.already_held), (0, 1));
    let adopted = cb
        .get_task(GetTaskRequest {
            name: format!("{pb}/tasks/{T1}"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adopted.state, TaskState::Ready as i32);
    let status = cb
        .adopt(adopt(
            vec![stored(&pb, "0193aaaa00007000800000000000a002", vec![7; 32])],
            vec![],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        refusal(&status),
        (Code::InvalidArgument, "tasks.stored.spec_id".into())
    );
    let status = cb
        .adopt(adopt(
            vec![stored(&pb, "t2", spec_id.clone())],
            vec![spec()],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        refusal(&status),
        (Code::InvalidArgument, "tasks.stored.task.name".into())
    );
    let status = cb
        .adopt(adopt(
            vec![stored(&pa, "0193aaaa00007000800000000000a003", spec_id)],
            vec![spec()],
        ))
        .await
        .unwrap_err();
    assert!(NotOwner::from_status(&status).is_some(), "{status:?}");

    // etcd goes away: the shards keep the ring they know and keep serving, and their
    // membership health turns NOT_SERVING.
    drop(etcd);
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        pm_proto::client::channel(&a.endpoint).unwrap(),
    );
    let membership = || tonic_health::pb::HealthCheckRequest {
        service: pm_scheduler_shard::MEMBERSHIP_HEALTH.into(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health
            .check(membership())
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health still {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::enqueue_acknowledged(&mut ca, item(&pa)).await;
    assert_eq!(a.ownership.ring().len(), 2);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_a_pipeline_that_moves_is_disconnected_even_with_no_tasks_held() {
    let etcd = Etcd::start();
    let stop = CancellationToken::new();
    let a = shard(&etcd.endpoint, "a", &stop).await;
    assert!(
        a.ownership
            .membership()
            .wait_for(Duration::from_secs(10), |r| r.len() == 1)
            .await
    );
    // A pipeline that a owns alone and that b will take when it joins.
    let both = pm_cluster::Ring::new(
        1,
        ["a", "b"].map(|id| Member {
            id: id.into(),
            address: String::new(),
            started_at: 0,
        }),
    );
    let pipeline = (0..100)
        .map(|i| format!("tenants/t/applications/app/pipelines/p{i}"))
        .find(|p| {
            let key = pm_cluster::RingKey::whole(pm_proto::names::PipelineName::parse(p).unwrap());
            both.owner(&key).unwrap().id == "b"
        })
        .unwrap();

    let (tx, answer) = common::connect_agent(&a.endpoint, &pipeline).await;
    let mut inbound = answer.expect("a owns the pipeline").into_inner();
    let welcome = inbound.message().await.unwrap().unwrap();
    assert!(matches!(
        welcome.message,
        Some(pm_proto::v1::server_message::Message::Welcome(_))
    ));

    let _b = shard(&etcd.endpoint, "b", &stop).await;
    let ended = tokio::time::timeout(Duration::from_secs(20), inbound.message())
        .await
        .expect("the stream is closed once b owns the pipeline");
    let status = ended.expect_err("closed with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(tx);
    stop.cancel();
}
