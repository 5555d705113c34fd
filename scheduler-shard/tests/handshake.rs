//! The agent stream refuses a bad handshake with the exact code and field, against a real
//! shard server on a random loopback port.

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use pm_proto::v1::{AgentMessage, Credit, Hello, agent_message};

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

#[tokio::test]
async fn a_bad_handshake_gets_the_exact_code_naming_the_field() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let scheduler = pm_scheduler_shard::open(pm_scheduler_shard::Options::default(), None).unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(pm_scheduler_shard::run(
        listener,
        scheduler,
        stop.clone().cancelled_owned(),
    ));
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
