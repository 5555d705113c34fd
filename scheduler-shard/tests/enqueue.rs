//! Enqueue with specs by reference, against a real shard server on a loopback port with its
//! store on disk: each bad task is refused on its own with the exact code and field, a task
//! naming a spec the shard does not hold is listed in `spec_needed`, and what was
//! acknowledged beside them is all there.

mod common;

use tokio_util::sync::CancellationToken;
use tonic::Code;

use pm_proto::internal::v1::enqueue_result;
use pm_proto::internal::v1::shard_service_client::ShardServiceClient;
use pm_proto::internal::v1::{EnqueueRequest, EnqueueTask};
use pm_proto::v1::{GetTaskRequest, ListTasksRequest};
use tonic::transport::Channel;

const PIPELINE: &str = "tenants/t/applications/a/pipelines/p";

/// A shard server on a loopback port, its store in a temp dir.
struct Shard {
    _dir: tempfile::TempDir,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Shard {
    async fn start() -> (ShardServiceClient<Channel>, Shard) {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let scheduler =
            pm_scheduler_shard::open(pm_scheduler_shard::Options::default(), Some(dir.path()))
                .unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(pm_scheduler_shard::run(
            listener,
            scheduler,
            stop.clone().cancelled_owned(),
        ));
        let client = pm_proto::client::shard(pm_proto::client::channel(&endpoint).unwrap());
        let shard = Shard {
            _dir: dir,
            stop,
            server,
        };
        (client, shard)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}

fn with_spec() -> EnqueueTask {
    common::item(PIPELINE)
}

fn by_id(spec_id: Vec<u8>) -> EnqueueTask {
    EnqueueTask {
        spec: None,
        spec_id,
        ..with_spec()
    }
}

#[tokio::test]
async fn tasks_name_their_spec_by_id_and_bad_ones_are_refused_alone() {
    let (mut client, shard) = Shard::start().await;
    let id = pm_spec::spec_id(&common::spec(vec!["true".into()])).to_vec();

    // One request: an id the shard does not hold yet, a malformed id, neither spec nor id,
    // the spec itself, and then the id alone (held by now: the task before brought it).
    let mut neither = by_id(Vec::new());
    neither.spec = None;
    let answer = client
        .enqueue(EnqueueRequest {
            tasks: vec![
                by_id(id.clone()),
                by_id(vec![1, 2, 3]),
                neither,
                with_spec(),
                by_id(id.clone()),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let outcome = |i: usize| answer.results[i].outcome.clone().unwrap();
    let refused = |i: usize| match outcome(i) {
        enqueue_result::Outcome::Error(e) => (Code::from(e.code), e.field),
        other => panic!("task {i} was accepted: {other:?}"),
    };
    assert_eq!(refused(0), (Code::FailedPrecondition, String::new()));
    assert_eq!(refused(1), (Code::InvalidArgument, "spec_id".into()));
    assert_eq!(refused(2), (Code::InvalidArgument, "spec".into()));
    assert_eq!(
        answer.spec_needed,
        vec![0],
        "only the unknown id asks for the spec"
    );
    let mut acknowledged = Vec::new();
    for i in [3, 4] {
        match outcome(i) {
            enqueue_result::Outcome::Task(t) => acknowledged.push(t),
            other => panic!("task {i} was refused: {other:?}"),
        }
    }

    // Sent again with the spec, the needed one is acknowledged; every acknowledged task is
    // there, and nothing refused was queued.
    acknowledged.push(common::enqueue_acknowledged(&mut client, with_spec()).await);
    for task in &acknowledged {
        let got = client
            .get_task(GetTaskRequest {
                name: task.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got, task);
    }
    let listed = client
        .list_tasks(ListTasksRequest {
            parent: PIPELINE.into(),
            ..ListTasksRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), acknowledged.len());
    shard.stop().await;
}

/// Asked for (as the gateway asks), a task queued by the call comes back as its id and time:
/// the caller rebuilds the task from what it sent, and it equals what the shard holds. A
/// repeat of an idempotency key comes whole, as the task the key first made, whether the
/// first was earlier in the same call or in an earlier one.
#[tokio::test]
async fn queued_tasks_come_back_as_ids_when_asked_and_repeats_whole() {
    let (mut client, shard) = Shard::start().await;
    let keyed = |param: &str| {
        let mut item = with_spec();
        let task = item.task.as_mut().unwrap();
        task.idempotency_key = "k".into();
        task.params.insert("p".into(), param.into());
        item
    };
    let sent = [with_spec(), keyed("first"), keyed("second")];
    let answer = client
        .enqueue(EnqueueRequest {
            tasks: sent.to_vec(),
            answer_queued_by_id: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut queued = Vec::new();
    for (i, result) in answer.results.iter().take(2).enumerate() {
        match result.outcome.clone().unwrap() {
            enqueue_result::Outcome::Queued(q) => queued.push((i, q)),
            other => panic!("task {i}: {other:?}"),
        }
    }
    for (i, q) in queued {
        let name = format!("{PIPELINE}/tasks/{}", q.id);
        let held = client
            .get_task(GetTaskRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(held.create_time_ms, q.create_time_ms);
        assert_eq!(held.id, q.id);
        let sent = sent[i].task.as_ref().unwrap();
        assert_eq!(
            (&held.params, held.priority, &held.idempotency_key),
            (&sent.params, sent.priority, &sent.idempotency_key)
        );
    }
    let first = match answer.results[2].outcome.clone().unwrap() {
        enqueue_result::Outcome::Task(t) => t,
        other => panic!("a repeat in the same call comes whole: {other:?}"),
    };
    assert_eq!(first.params["p"], "first");

    // A later call: the repeat comes whole; without the flag, a new task comes whole too.
    let answer = client
        .enqueue(EnqueueRequest {
            tasks: vec![keyed("third"), with_spec()],
            answer_queued_by_id: true,
        })
        .await
        .unwrap()
        .into_inner();
    match answer.results[0].outcome.clone().unwrap() {
        enqueue_result::Outcome::Task(t) => assert_eq!(t, first),
        other => panic!("a repeat comes whole: {other:?}"),
    }
    let answer = client
        .enqueue(EnqueueRequest {
            tasks: vec![with_spec()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        answer.results[0].outcome,
        Some(enqueue_result::Outcome::Task(_))
    ));
    shard.stop().await;
}
