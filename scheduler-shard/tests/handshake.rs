//! The agent stream's protocol against a real shard server on a random loopback port: a bad
//! handshake gets the exact code and field; a result sent in parts is put together, and
//! parts that break the protocol end the stream naming the field.

mod common;

use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use pm_proto::v1::{
    AgentMessage, Credit, Hello, JobResult, ResultPart, StepResult, TaskResult, agent_message,
    server_message,
};

async fn first_answer(endpoint: &str, first: agent_message::Message) -> tonic::Status {
    let mut client = pm_proto::client::agents(pm_proto::client::channel(endpoint).unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(AgentMessage {
        message: Some(first),
    })
    .unwrap();
    let result = client.connect(UnboundedReceiverStream::new(rx)).await;
    match result {
        Err(status) => status,
        Ok(response) => {
            let mut inbound = response.into_inner();
            let message = inbound.message().await;
            panic!("the shard accepted the stream: {message:?}")
        }
    }
}

fn hello() -> Hello {
    Hello {
        agent_id: "a".into(),
        slots: 1,
        protocol_min: pm_proto::AGENT_PROTOCOL_VERSION,
        protocol_max: pm_proto::AGENT_PROTOCOL_VERSION,
        ..Hello::default()
    }
}

/// A shard with default options in this process on a random port: its endpoint, what stops
/// it, and its server task.
type Served = (
    String,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
);

async fn serve() -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let scheduler = pm_scheduler_shard::open(pm_scheduler_shard::Options::default(), None).unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(pm_scheduler_shard::run(
        listener,
        scheduler,
        stop.clone().cancelled_owned(),
    ));
    (endpoint, stop, server)
}

#[tokio::test]
async fn a_bad_handshake_gets_the_exact_code_naming_the_field() {
    let (endpoint, stop, server) = serve().await;
    let field = |s: &tonic::Status| pm_proto::status::violated_field(s).unwrap_or_default();

    let s = first_answer(
        &endpoint,
        agent_message::Message::Credit(Credit { slots: 1 }),
    )
    .await;
    assert_eq!(
        (s.code(), field(&s).as_str()),
        (Code::InvalidArgument, "message")
    );

    let s = first_answer(
        &endpoint,
        agent_message::Message::Hello(Hello {
            slots: 0,
            ..hello()
        }),
    )
    .await;
    assert_eq!(
        (s.code(), field(&s).as_str()),
        (Code::InvalidArgument, "hello.slots")
    );

    let s = first_answer(
        &endpoint,
        agent_message::Message::Hello(Hello {
            agent_id: String::new(),
            ..hello()
        }),
    )
    .await;
    assert_eq!(
        (s.code(), field(&s).as_str()),
        (Code::InvalidArgument, "hello.agent_id")
    );

    let bad_pipeline = Hello {
        pipelines: vec!["pipelines/x".into()],
        ..hello()
    };
    let s = first_answer(&endpoint, agent_message::Message::Hello(bad_pipeline)).await;
    assert_eq!(
        (s.code(), field(&s).as_str()),
        (Code::InvalidArgument, "hello.pipelines[0]")
    );

    let future = Hello {
        protocol_min: 99,
        protocol_max: 99,
        ..hello()
    };
    let s = first_answer(&endpoint, agent_message::Message::Hello(future)).await;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");

    stop.cancel();
    server.await.unwrap().unwrap();
}

/// A shard on a random port, a pipeline's task, and an agent stream holding its Assign.
struct Assigned {
    endpoint: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    tx: mpsc::UnboundedSender<AgentMessage>,
    inbound: tonic::Streaming<pm_proto::v1::ServerMessage>,
    task: String,
    lease: pm_proto::v1::Lease,
}

const PIPELINE: &str = "tenants/t/applications/a/pipelines/p";

async fn assigned() -> Assigned {
    let (endpoint, stop, server) = serve().await;
    let mut client = pm_proto::client::shard(pm_proto::client::channel(&endpoint).unwrap());
    let item = pm_proto::internal::v1::EnqueueTask {
        task: Some(pm_proto::v1::Task {
            pipeline: PIPELINE.into(),
            ..Default::default()
        }),
        spec: Some(common::spec(vec!["print".into()])),
        ..Default::default()
    };
    let task = common::enqueue_acknowledged(&mut client, item).await.name;
    let (tx, answer) = common::connect_agent(&endpoint, PIPELINE).await;
    let mut inbound = answer.unwrap().into_inner();
    let lease = loop {
        let message = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .expect("an Assign within 30 s")
            .unwrap()
            .expect("the stream stays open");
        match message.message {
            Some(server_message::Message::Welcome(w)) => {
                assert_eq!(w.protocol_version, 2, "both sides speak parts");
            }
            Some(server_message::Message::Assign(a)) => break a.lease.unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    };
    Assigned {
        endpoint,
        stop,
        server,
        tx,
        inbound,
        task,
        lease,
    }
}

fn part(lease: &pm_proto::v1::Lease, data: &[u8], last: bool, total: usize) -> AgentMessage {
    AgentMessage {
        message: Some(agent_message::Message::ResultPart(ResultPart {
            lease: Some(lease.clone()),
            data: data.to_vec(),
            last,
            total_bytes: total as u32,
        })),
    }
}

/// A result of a MiB of stdout, encoded.
fn big_result() -> (TaskResult, Vec<u8>) {
    let result = TaskResult {
        succeeded: true,
        jobs: vec![JobResult {
            steps: vec![StepResult {
                command: "print".into(),
                stdout: "x".repeat(1024 * 1024),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let bytes = result.encode_to_vec();
    (result, bytes)
}

#[tokio::test]
async fn a_result_sent_in_parts_is_put_together() {
    let mut a = assigned().await;
    let (result, bytes) = big_result();
    let chunks: Vec<&[u8]> = bytes.chunks(pm_proto::RESULT_PART_BYTES).collect();
    assert!(chunks.len() > 10);
    for (i, chunk) in chunks.iter().enumerate() {
        a.tx.send(part(&a.lease, chunk, i + 1 == chunks.len(), bytes.len()))
            .unwrap();
    }
    let mut client = pm_proto::client::shard(pm_proto::client::channel(&a.endpoint).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = common::until_done(&mut client, &a.task, deadline).await;
    assert_eq!(done.result.unwrap(), result, "the whole result, as sent");
    // The stream stays open for the next task.
    drop(a.tx);
    let end = tokio::time::timeout(Duration::from_secs(10), a.inbound.message()).await;
    assert!(matches!(end, Ok(Ok(None))), "{end:?}");
    a.stop.cancel();
    a.server.await.unwrap().unwrap();
}

#[tokio::test]
async fn parts_that_break_the_protocol_end_the_stream_naming_the_field() {
    let (_, bytes) = big_result();
    type Lease = pm_proto::v1::Lease;
    // What the agent sends, from its lease and a result's bytes.
    type Sends = fn(&Lease, &[u8]) -> Vec<AgentMessage>;
    let cases: Vec<(&str, Sends)> = vec![
        // Another result's part before this one's last.
        ("result_part", |l, b| {
            let other = Lease {
                lease_id: format!("{}-other", l.lease_id),
                ..l.clone()
            };
            let half = b.len() / 2;
            vec![
                part(l, &b[..half], false, b.len()),
                part(&other, &b[half..], true, b.len()),
            ]
        }),
        // Fewer bytes than declared.
        ("result_part.total_bytes", |l, b| {
            vec![part(l, &b[..b.len() / 2], true, b.len())]
        }),
        // More bytes than declared.
        ("result_part.data", |l, b| {
            vec![part(l, b, true, b.len() / 2)]
        }),
        // Past the 4 MiB a result may have.
        ("result_part.total_bytes", |l, b| {
            vec![part(l, &b[..1], false, pm_proto::MAX_MESSAGE_BYTES + 1)]
        }),
        // Bytes that are no TaskResult.
        ("result_part.data", |l, _| {
            vec![part(l, &[0xff; 16], true, 16)]
        }),
    ];
    for (field, case) in cases {
        let mut a = assigned().await;
        for m in case(&a.lease, &bytes) {
            a.tx.send(m).unwrap();
        }
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match a.inbound.message().await {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            }
        })
        .await
        .expect("the stream ends");
        let status = end.expect_err("ended with a status");
        assert_eq!(
            (
                status.code(),
                pm_proto::status::violated_field(&status).unwrap_or_default()
            ),
            (Code::InvalidArgument, field.to_owned()),
            "{status:?}"
        );
        // The acknowledged task is not lost nor finished by the broken result: it stays
        // leased until its lease runs out, then runs again.
        let mut client = pm_proto::client::shard(pm_proto::client::channel(&a.endpoint).unwrap());
        let task = client
            .get_task(pm_proto::v1::GetTaskRequest {
                name: a.task.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (task.state, task.attempt),
            (pm_proto::v1::TaskState::InProgress as i32, 1),
            "{field}"
        );
        a.stop.cancel();
        a.server.await.unwrap().unwrap();
    }
}
