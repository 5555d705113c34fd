//! Enqueue with specs by reference, against a real shard server on a loopback port with its
//! store on disk: each bad task is refused on its own with the exact code and field, a task
//! naming a spec the shard does not hold is listed in `spec_needed`, and what was
//! acknowledged beside them is all there.

mod common;

use tokio_util::sync::CancellationToken;
use tonic::Code;

use pm_proto::internal::v1::{EnqueueRequest, EnqueueTask};
use pm_proto::v1::{GetTaskRequest, ListTasksRequest, Task, submit_task_result};

const PIPELINE: &str = "tenants/t/applications/a/pipelines/p";

fn with_spec() -> EnqueueTask {
    EnqueueTask {
        task: Some(Task {
            pipeline: PIPELINE.into(),
            priority: 10,
            ..Task::default()
        }),
        spec: Some(common::spec(vec!["true".into()])),
        client_priority: 10,
        ..EnqueueTask::default()
    }
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
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let scheduler =
        pm_scheduler_shard::open(pm_scheduler_shard::Options::default(), Some(dir.path())).unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(pm_scheduler_shard::run(
        listener,
        scheduler,
        stop.clone().cancelled_owned(),
    ));
    let mut client = pm_proto::client::shard(pm_proto::client::channel(&endpoint).unwrap());
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
        })
        .await
        .unwrap()
        .into_inner();
    let outcome = |i: usize| answer.results[i].outcome.clone().unwrap();
    let refused = |i: usize| match outcome(i) {
        submit_task_result::Outcome::Error(e) => (Code::from(e.code), e.field),
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
            submit_task_result::Outcome::Task(t) => acknowledged.push(t),
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
    stop.cancel();
    server.await.unwrap().unwrap();
}
