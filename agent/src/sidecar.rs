//! Sidecar executors. In a pipeline pod each executor container (wget, tesseract, ...) runs
//! `pm-agent exec-server --socket /mnt/pipe/<executor>.sock`; the agent sends every step of a
//! job on that executor over the socket, and the command runs inside the container, in the
//! work directory both share. [`serve`] is the exec-server; [`run_step`] the agent's side.
//!
//! The exec-server runs a step exactly as the host executor does ([`crate::executor`]): own
//! process group, bounded output, SIGTERM then SIGKILL on timeout. A caller that goes away
//! (the task was cancelled, the agent died) kills the step too. Commands it runs see
//! `PM_SIDECAR_SOCKET`, the socket they came through.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Uri};
use tonic::{Request, Response, Status};

use pm_proto::MAX_MESSAGE_BYTES;
use pm_proto::internal::v1::exec_service_server::{ExecService, ExecServiceServer};
use pm_proto::internal::v1::{ExecEvent, ExecOutput, ExecRequest, exec_event};
use pm_proto::v1::{OutputStream, StepResult};

use crate::executor::{self, Step};

/// How an exec-server confines what it is asked to run.
#[derive(Debug, Clone)]
pub struct ExecServerOptions {
    /// Work directories must be inside it (the shared volume, `/mnt/pipe`).
    pub work_root: PathBuf,
    /// Most bytes of stdout and of stderr kept per step, whatever the caller asks.
    pub max_output_bytes: u64,
    /// Variables of this container's environment that its jobs may see (besides PATH).
    pub pass_env: Vec<String>,
    /// Let this group use the socket too (mode 0660); else only this user (0600).
    pub socket_group: Option<u32>,
    /// Bind each step's work directory at this mount point in a private mount namespace
    /// (`/mnt/pipe`, as the documents' commands expect; [`crate::work_mount`]).
    pub work_mount: crate::WorkMount,
}

impl Default for ExecServerOptions {
    fn default() -> Self {
        Self {
            work_root: PathBuf::from("/mnt/pipe"),
            max_output_bytes: 1024 * 1024,
            pass_env: Vec::new(),
            socket_group: None,
            work_mount: crate::WorkMount::Off,
        }
    }
}

struct ExecServer {
    socket: PathBuf,
    /// `work_root`, resolved.
    work_root: PathBuf,
    max_output_bytes: u64,
    base_env: Vec<(String, String)>,
    work_mount: crate::WorkMount,
}

#[tonic::async_trait]
impl ExecService for ExecServer {
    type ExecStream = ReceiverStream<Result<ExecEvent, Status>>;

    async fn exec(
        &self,
        request: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let req = request.into_inner();
        if req.command.trim().is_empty() {
            return Err(pm_proto::status::invalid_argument(
                "command",
                "must not be empty",
            ));
        }
        let work_dir = PathBuf::from(&req.work_dir);
        if !work_dir.is_absolute() || !work_dir.is_dir() {
            return Err(pm_proto::status::invalid_argument(
                "work_dir",
                &format!(
                    "{:?} is not a directory here (is the volume shared?)",
                    req.work_dir
                ),
            ));
        }
        // Resolved, so `..` and symlinks cannot lead out of the work root.
        let work_dir = work_dir
            .canonicalize()
            .map_err(|e| pm_proto::status::invalid_argument("work_dir", &e.to_string()))?;
        if work_dir == self.work_root || !work_dir.starts_with(&self.work_root) {
            return Err(pm_proto::status::invalid_argument(
                "work_dir",
                &format!(
                    "{} is not inside this exec-server's work root {}",
                    work_dir.display(),
                    self.work_root.display()
                ),
            ));
        }
        // Which container ran which step is read from here (`kubectl logs`, `podman logs`):
        // the program and the task's directory, not the command, which carries the task's
        // parameters (a signed URL, say) into logs other people read.
        let program = req.command.split_whitespace().next().unwrap_or_default();
        tracing::info!(program = %program, work_dir = %work_dir.display(), "exec");
        let output_limit = req.output_limit.min(self.max_output_bytes);
        let base_env = self.base_env.clone();
        let mut env: Vec<(String, String)> = req.env.into_iter().collect();
        env.push((
            "PM_SIDECAR_SOCKET".into(),
            self.socket.display().to_string(),
        ));
        // Bound at the mount point, the step finds its directory there.
        let binding = self.work_mount.binding(&work_dir);
        if let Some(binding) = &binding {
            env.retain(|(name, _)| name != "PM_WORK_DIR");
            env.push(("PM_WORK_DIR".into(), binding.target().display().to_string()));
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            // The caller hanging up cancels the step.
            let cancel = CancellationToken::new();
            let watch = {
                let (tx, cancel) = (tx.clone(), cancel.clone());
                tokio::spawn(async move {
                    tx.closed().await;
                    cancel.cancel();
                })
            };
            let step = Step {
                command: &req.command,
                work_dir: &work_dir,
                base_env: &base_env,
                env: &env,
                deadline: (req.timeout_ms > 0)
                    .then(|| Instant::now() + Duration::from_millis(req.timeout_ms)),
                output_limit: usize::try_from(output_limit).unwrap_or(usize::MAX),
                kill_grace: Duration::from_millis(req.kill_grace_ms),
                mount: binding.as_ref(),
            };
            let result = executor::run_step(&step, &cancel, |stream, data| {
                let event = ExecEvent {
                    event: Some(exec_event::Event::Output(ExecOutput {
                        stream: stream as i32,
                        data: data.to_owned(),
                    })),
                };
                // A slow reader loses live chunks, never the final result.
                let _ = tx.try_send(Ok(event));
            })
            .await;
            let finished = ExecEvent {
                event: Some(exec_event::Event::Finished(result)),
            };
            let _ = tx.send(Ok(finished)).await;
            watch.abort();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves the exec-server on a Unix socket at `socket` until `shutdown`. A stale socket
/// file from an earlier run is replaced. The socket is this user's only (0600), or also its
/// group's (0660) with `socket_group`: whoever can connect runs commands here.
pub async fn serve(
    socket: &Path,
    options: ExecServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let work_root = options
        .work_root
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("work root {}: {e}", options.work_root.display()))?;
    // Bound under a temporary name and given its mode and group there, then renamed into
    // place: nothing can connect at `socket` before its permissions are final (a bound
    // socket accepts connections at once, with the umask's mode).
    let mut staging = socket.as_os_str().to_owned();
    staging.push(format!(".{}.tmp", std::process::id()));
    let staging = std::path::PathBuf::from(staging);
    // The sockets' directory on a fresh shared volume (an emptyDir) is made by whichever
    // exec-server starts first.
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("socket directory {}: {e}", dir.display()))?;
    }
    for path in [socket, staging.as_path()] {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = UnixListener::bind(&staging)?;
    let mode = if options.socket_group.is_some() {
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = options.socket_group {
        std::os::unix::fs::chown(&staging, None, Some(gid))?;
    }
    std::fs::rename(&staging, socket)?;
    tracing::info!(socket = %socket.display(), work_root = %work_root.display(), "exec-server serving");
    let server = ExecServer {
        socket: socket.to_owned(),
        work_root,
        max_output_bytes: options.max_output_bytes,
        base_env: executor::base_env(&options.pass_env),
        work_mount: options.work_mount,
    };
    pm_proto::server::builder()
        .add_service(ExecServiceServer::new(server).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Executors reached over sockets: executor name -> socket path.
pub type Sidecars = HashMap<String, PathBuf>;

/// How often [`wait_until_reachable`] tries the sockets, and says which it still waits for.
const REACH_EVERY: Duration = Duration::from_millis(100);
const REACH_LOG_EVERY: Duration = Duration::from_secs(10);

/// Returns once every sidecar's socket accepts a connection, or at `shutdown`. The containers
/// of a pod start in any order: an agent that took tasks before its executors listened would
/// fail their jobs ("could not start") instead of running them.
pub async fn wait_until_reachable(sidecars: &Sidecars, shutdown: &CancellationToken) {
    let mut names: Vec<&String> = sidecars.keys().collect();
    names.sort();
    let mut logged: Option<Instant> = None;
    loop {
        let mut missing = Vec::new();
        for name in &names {
            if tokio::net::UnixStream::connect(&sidecars[*name])
                .await
                .is_err()
            {
                missing.push(name.as_str());
            }
        }
        if missing.is_empty() {
            if logged.is_some() {
                tracing::info!("every sidecar executor listens");
            }
            return;
        }
        if logged.is_none_or(|at| at.elapsed() >= REACH_LOG_EVERY) {
            tracing::info!(
                ?missing,
                "waiting for sidecar executors to listen before taking tasks"
            );
            logged = Some(Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(REACH_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Runs a step in the sidecar at `socket`; like [`executor::run_step`], it never fails: an
/// unreachable sidecar is reported as a step that could not start (exit code 127).
pub async fn run_step(
    socket: &Path,
    step: &Step<'_>,
    cancel: &CancellationToken,
    mut on_output: impl FnMut(OutputStream, &str),
) -> StepResult {
    let started = Instant::now();
    let unreachable = |why: String| StepResult {
        command: step.command.to_owned(),
        exit_code: 127,
        stderr: format!("[pm] sidecar {}: {why}", socket.display()),
        duration_ms: started.elapsed().as_millis() as u64,
        ..StepResult::default()
    };
    let path = socket.to_owned();
    // The URI is required by the API and ignored by the connector.
    let channel = match Endpoint::from_static("http://sidecar")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
    {
        Ok(channel) => channel,
        Err(e) => return unreachable(e.to_string()),
    };
    let request = ExecRequest {
        command: step.command.to_owned(),
        work_dir: step.work_dir.display().to_string(),
        env: step.env.iter().cloned().collect(),
        output_limit: step.output_limit as u64,
        timeout_ms: step.deadline.map_or(0, |d| {
            d.saturating_duration_since(Instant::now())
                .as_millis()
                .max(1) as u64
        }),
        kill_grace_ms: step.kill_grace.as_millis() as u64,
    };
    let mut client = pm_proto::client::exec(channel);
    let mut events = match client.exec(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return unreachable(status.message().to_owned()),
    };
    loop {
        // Cancelling drops the stream: the exec-server sees the caller go and kills the step.
        let event = tokio::select! {
            event = events.message() => event,
            _ = cancel.cancelled() => {
                let mut r = unreachable("task cancelled".into());
                r.exit_code = -1;
                r.stderr = "\n[pm] step killed: task cancelled\n".into();
                return r;
            }
        };
        match event {
            Ok(Some(ExecEvent {
                event: Some(exec_event::Event::Output(out)),
            })) => {
                let stream = OutputStream::try_from(out.stream).unwrap_or(OutputStream::Stdout);
                on_output(stream, &out.data);
            }
            Ok(Some(ExecEvent {
                event: Some(exec_event::Event::Finished(result)),
            })) => return result,
            Ok(Some(_)) => {}
            Ok(None) => return unreachable("ended the stream without a result".into()),
            Err(status) => return unreachable(status.message().to_owned()),
        }
    }
}
