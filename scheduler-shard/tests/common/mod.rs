//! What the shard's process-level tests share: the address a server bound, a stable address in
//! front of a shard that restarts, a one-job spec, one acknowledged submit, a wait for a task
//! to be DONE, and an agent stream opened with a Hello.
#![allow(dead_code)]

use pm_proto::internal::v1::enqueue_result;
use pm_proto::internal::v1::shard_service_client::ShardServiceClient;
use pm_proto::internal::v1::{EnqueueRequest, EnqueueTask};
use pm_proto::v1::{AgentMessage, Hello, Job, PipelineSpec, Stage, Task, agent_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Where a server given a port-0 address listens: the `addr` of the first line past byte
/// `from` of its `log` (its stderr) that says `message` (`shard serving`, `metrics listening`,
/// ...). The kernel picks the port at the bind, so nothing can take it first, as another
/// test once did between a free port's pick and its bind (a CI flake). Waits at most 60 s,
/// and panics with the log's end if `child` exits meanwhile.
pub async fn logged_addr(
    log: &std::path::Path,
    from: u64,
    message: &str,
    child: &mut std::process::Child,
) -> std::net::SocketAddr {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = std::fs::read(log).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
        if let Some(addr) = text.lines().find_map(|line| addr_in(line, message)) {
            return addr;
        }
        let tail: Vec<&str> = text.lines().rev().take(10).collect();
        if let Ok(Some(status)) = child.try_wait() {
            panic!("exited ({status}) before `{message}`; its log ends: {tail:#?}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no `{message}` in {} in 60 s; it ends: {tail:#?}",
            log.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The address of a log line `... {message} addr=Some(127.0.0.1:PORT) ...`.
fn addr_in(line: &str, message: &str) -> Option<std::net::SocketAddr> {
    let fields = &line[line.find(message)? + message.len()..];
    let value = fields
        .split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))?;
    let value = value
        .strip_prefix("Some(")
        .map_or(value, |v| v.trim_end_matches(')'));
    value.parse().ok()
}

/// The length of `log` now (0 if there is none): where the next process's lines begin.
pub fn log_end(log: &std::path::Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// A fixed loopback address that forwards each connection to the shard of the moment, the
/// way a Kubernetes Service stays put while its pod restarts. A shard restarted on the port
/// it had could find that port taken by another test meanwhile; behind this, every start
/// takes a fresh one while clients and agents keep one endpoint.
pub struct Forwarder {
    pub endpoint: String,
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
    accept: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    pub async fn start() -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let target = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(0));
        let to = target.clone();
        // Aborting this task drops the set, which aborts every forwarded connection.
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let port = to.load(Ordering::SeqCst);
                connections.spawn(async move {
                    // No shard up: the client sees the connection close, as with a dead pod.
                    if port == 0 {
                        return;
                    }
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Forwarder {
            endpoint,
            target,
            accept,
        }
    }

    /// New connections go to the shard on `port` from now on; with 0, to none (they close).
    pub fn forward_to(&self, port: u16) {
        self.target.store(port, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One stage of one job running `commands` on the host.
pub fn spec(commands: Vec<String>) -> PipelineSpec {
    PipelineSpec {
        stages: vec![Stage {
            name: "s".into(),
            jobs: vec![Job {
                name: "j".into(),
                executor: "host".into(),
                commands,
                ..Job::default()
            }],
            priority: None,
        }],
        ..PipelineSpec::default()
    }
}

/// A task of `pipeline` (priority 10) that runs `true`, sent with its spec.
pub fn item(pipeline: &str) -> EnqueueTask {
    EnqueueTask {
        task: Some(Task {
            pipeline: pipeline.into(),
            priority: 10,
            ..Task::default()
        }),
        spec: Some(spec(vec!["true".into()])),
        client_priority: 10,
        ..EnqueueTask::default()
    }
}

/// Submits one task; panics unless the shard acknowledges it (durable).
pub async fn enqueue_acknowledged(
    client: &mut ShardServiceClient<tonic::transport::Channel>,
    item: EnqueueTask,
) -> Task {
    enqueue_all_acknowledged(client, vec![item]).await.remove(0)
}

/// Submits `items` in one call; panics unless the shard acknowledges every one (durable).
/// Returns the tasks in the order sent.
pub async fn enqueue_all_acknowledged(
    client: &mut ShardServiceClient<tonic::transport::Channel>,
    items: Vec<EnqueueTask>,
) -> Vec<Task> {
    let sent = items.len();
    let answer = client
        .enqueue(EnqueueRequest {
            tasks: items,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let tasks: Vec<Task> = answer
        .results
        .iter()
        .filter_map(|r| match &r.outcome {
            Some(enqueue_result::Outcome::Task(task)) => Some(task.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(tasks.len(), sent, "not acknowledged: {answer:?}");
    tasks
}

/// Asks for task `name` until it is DONE, and returns it; panics at `deadline`.
pub async fn until_done(
    client: &mut ShardServiceClient<tonic::transport::Channel>,
    name: &str,
    deadline: std::time::Instant,
) -> Task {
    loop {
        let task = client
            .get_task(pm_proto::v1::GetTaskRequest {
                name: name.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        if task.state == pm_proto::v1::TaskState::Done as i32 {
            return task;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} not DONE in time: state {}, attempt {}",
            task.state,
            task.attempt
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Opens an agent stream at `endpoint` for `pipeline` with one slot; the sender keeps the
/// agent's side open.
pub async fn connect_agent(
    endpoint: &str,
    pipeline: &str,
) -> (
    mpsc::UnboundedSender<AgentMessage>,
    Result<tonic::Response<tonic::codec::Streaming<pm_proto::v1::ServerMessage>>, tonic::Status>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(AgentMessage {
        message: Some(agent_message::Message::Hello(Hello {
            agent_id: "x".into(),
            slots: 1,
            pipelines: vec![pipeline.to_owned()],
            protocol_min: pm_proto::AGENT_PROTOCOL_VERSION,
            protocol_max: pm_proto::AGENT_PROTOCOL_VERSION,
            ..Hello::default()
        })),
    })
    .unwrap();
    let mut agents = pm_proto::client::agents(pm_proto::client::channel(endpoint).unwrap());
    let answer = agents.connect(UnboundedReceiverStream::new(rx)).await;
    (tx, answer)
}
