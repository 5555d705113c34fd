//! The executor: runs one command with `sh -c` in the task's work directory and reports how
//! it ended.
//!
//! A command's environment is built, never inherited: PATH, HOME (the work directory), the
//! variables the operator allowed (`--pass-env`), and the step's own (`PM_*`, parameters).
//! The agent's own variables (its credentials among them) never reach a job.
//!
//! Each command gets its own process group, so a timeout or a cancel reaches everything it
//! started, background children included: SIGTERM to the group, then SIGKILL after a grace
//! period. When the shell itself exits, whatever it left running in its group is killed too:
//! a step is over when its command is. Descendants that left the group (`setsid`, daemons)
//! are found by the step's own `PM_STEP_ID` in their environment and killed as well; only a
//! process that also dropped that variable (`env -i`) escapes (a cgroup per job would
//! close that, where one is available). Output is captured up to a bound per stream (marked
//! when cut) and handed to `on_output` as it arrives.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use pm_proto::v1::{OutputStream, StepResult};

use crate::work_mount::Binding;

/// How one step runs.
#[derive(Debug, Clone)]
pub struct Step<'a> {
    /// The command after parameter substitution.
    pub command: &'a str,
    pub work_dir: &'a Path,
    /// This process's variables a job may see (see [`base_env`]).
    pub base_env: &'a [(String, String)],
    /// The step's own variables: `PM_*` and the task's parameters.
    pub env: &'a [(String, String)],
    /// Kill the step at this instant.
    pub deadline: Option<Instant>,
    /// Bytes of stdout and of stderr kept.
    pub output_limit: usize,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Enter a private mount namespace with the work directory at `/mnt/pipe` first
    /// ([`crate::work_mount`]).
    pub mount: Option<&'a Binding>,
}

/// PATH when this process has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a job's environment starts from: this process's PATH (or a default) and the
/// variables named in `allow` that this process has. Nothing else of it.
pub fn base_env(allow: &[String]) -> Vec<(String, String)> {
    let mut env = vec![(
        "PATH".to_owned(),
        std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned()),
    )];
    for name in allow {
        if name != "PATH"
            && let Ok(value) = std::env::var(name)
        {
            env.push((name.clone(), value));
        }
    }
    env
}

/// Bytes kept of one output stream.
struct Capture {
    bytes: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Self {
            bytes: Vec::new(),
            limit,
            truncated: false,
        }
    }

    /// Keeps what fits and returns it (for streaming); marks the rest as cut.
    fn push<'b>(&mut self, chunk: &'b [u8]) -> &'b [u8] {
        let room = self.limit.saturating_sub(self.bytes.len());
        let kept = &chunk[..chunk.len().min(room)];
        if kept.len() < chunk.len() {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(kept);
        kept
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

async fn pump(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    stream: OutputStream,
    tx: mpsc::Sender<(OutputStream, Vec<u8>)>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((stream, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The variable that tells a step's processes apart from every other's.
pub const STEP_ID_VAR: &str = "PM_STEP_ID";

/// Kills every process whose environment holds `marker` (`PM_STEP_ID=...`), and the groups
/// they lead: a step's descendants that left its process group. A few passes, for processes
/// that forked while being killed.
fn kill_marked(marker: &str) {
    let mut needle = marker.as_bytes().to_vec();
    needle.push(0);
    for _ in 0..3 {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut found = 0;
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // Another user's process, or one gone meanwhile: not ours either way.
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            let ours = environ
                .split_inclusive(|b| *b == 0)
                .any(|var| var == needle.as_slice());
            if ours {
                found += 1;
                let pid = Pid::from_raw(pid);
                if nix::unistd::getpgid(Some(pid)).is_ok_and(|g| g == pid) {
                    let _ = killpg(pid, Signal::SIGKILL);
                }
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            }
        }
        if found == 0 {
            return;
        }
    }
}

fn signal_group(pgid: Option<u32>, signal: Signal) {
    if let Some(pgid) = pgid {
        // ESRCH (the group is gone already) is the good case.
        let _ = killpg(Pid::from_raw(pgid as i32), signal);
    }
}

/// Why a step was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    Cancel,
}

/// Runs one step. Never fails: a command that cannot even start is reported as exit code
/// 127 with the reason on stderr, like a shell would.
pub async fn run_step(
    step: &Step<'_>,
    cancel: &CancellationToken,
    mut on_output: impl FnMut(OutputStream, &str),
) -> StepResult {
    let started = Instant::now();
    let step_id = format!("{:016x}", rand::random::<u64>());
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(step.command)
        .current_dir(step.work_dir)
        .env_clear()
        .env("HOME", step.mount.map_or(step.work_dir, Binding::target))
        .envs(step.base_env.iter().map(|(k, v)| (k, v)))
        .envs(step.env.iter().map(|(k, v)| (k, v)))
        .env(STEP_ID_VAR, &step_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(binding) = step.mount {
        binding.attach_tokio(&mut command);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return StepResult {
                command: step.command.to_owned(),
                exit_code: 127,
                stderr: format!("cannot start sh: {e}"),
                duration_ms: started.elapsed().as_millis() as u64,
                ..StepResult::default()
            };
        }
    };
    let pgid = child.id();
    let (tx, mut rx) = mpsc::channel(64);
    let readers = [
        child
            .stdout
            .take()
            .map(|r| tokio::spawn(pump(r, OutputStream::Stdout, tx.clone()))),
        child
            .stderr
            .take()
            .map(|r| tokio::spawn(pump(r, OutputStream::Stderr, tx.clone()))),
    ];
    drop(tx);
    let mut stdout = Capture::new(step.output_limit);
    let mut stderr = Capture::new(step.output_limit);
    let mut take = |(stream, bytes): (OutputStream, Vec<u8>)| {
        let capture = if stream == OutputStream::Stdout {
            &mut stdout
        } else {
            &mut stderr
        };
        let kept = capture.push(&bytes);
        if !kept.is_empty() {
            on_output(stream, &String::from_utf8_lossy(kept));
        }
    };

    let deadline = async {
        match step.deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut stopped = None;
    let mut output_open = true;
    let status: std::io::Result<ExitStatus> = loop {
        tokio::select! {
            status = child.wait() => break status,
            chunk = rx.recv(), if output_open => match chunk {
                Some(chunk) => take(chunk),
                None => output_open = false,
            },
            _ = &mut deadline, if stopped.is_none() => {
                stopped = Some(Stop::Timeout);
                break terminate(&mut child, pgid, step.kill_grace).await;
            }
            _ = cancel.cancelled(), if stopped.is_none() => {
                stopped = Some(Stop::Cancel);
                break terminate(&mut child, pgid, step.kill_grace).await;
            }
        }
    };
    // Whatever the command left behind in its group goes with it, and whatever left the group
    // still carrying this step's id; then the pipes close.
    signal_group(pgid, Signal::SIGKILL);
    let marker = format!("{STEP_ID_VAR}={step_id}");
    let _ = tokio::task::spawn_blocking(move || kill_marked(&marker)).await;
    // A process that left the group (setsid) could hold a pipe open: bound the drain.
    let drain_until = Instant::now() + Duration::from_secs(2);
    while output_open {
        match tokio::time::timeout_at(drain_until, rx.recv()).await {
            Ok(Some(chunk)) => take(chunk),
            Ok(None) | Err(_) => output_open = false,
        }
    }
    for reader in readers.into_iter().flatten() {
        reader.abort();
    }

    let (exit_code, signal) = match &status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            (s.code().unwrap_or(-1), s.signal().unwrap_or(0))
        }
        Err(_) => (-1, 0),
    };
    if let Err(e) = &status {
        stderr.push(format!("\nwaiting for the command failed: {e}").as_bytes());
    }
    match stopped {
        Some(Stop::Timeout) => {
            stderr.push(b"\n[pm] step killed: timeout\n");
        }
        Some(Stop::Cancel) => {
            stderr.push(b"\n[pm] step killed: task cancelled\n");
        }
        None => {}
    }
    StepResult {
        command: step.command.to_owned(),
        exit_code,
        signal,
        duration_ms: started.elapsed().as_millis() as u64,
        stdout: stdout.text(),
        stderr: stderr.text(),
        stdout_truncated: stdout.truncated,
        stderr_truncated: stderr.truncated,
        timed_out: stopped == Some(Stop::Timeout),
    }
}

/// SIGTERM to the group, SIGKILL after the grace period; returns the shell's exit status.
async fn terminate(
    child: &mut tokio::process::Child,
    pgid: Option<u32>,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            signal_group(pgid, Signal::SIGKILL);
            child.wait().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step<'a>(command: &'a str, dir: &'a Path) -> Step<'a> {
        Step {
            command,
            work_dir: dir,
            base_env: &[],
            env: &[],
            deadline: None,
            mount: None,
            output_limit: 1024,
            kill_grace: Duration::from_millis(500),
        }
    }

    /// Runs `command` with a 5 s deadline and checks that it printed "ready" and was then
    /// killed by the deadline. 5 s is far more than a shell needs to write a file, even on a
    /// loaded machine; the step says when it is ready, so a miss fails here, not in a read of
    /// a missing file.
    async fn timed_out_after_ready(command: &str, dir: &Path) -> StepResult {
        let mut s = step(command, dir);
        s.deadline = Some(Instant::now() + Duration::from_secs(5));
        let r = run_step(&s, &CancellationToken::new(), |_, _| {}).await;
        assert!(
            r.stdout.contains("ready"),
            "not ready within the deadline: {r:?}"
        );
        assert!(r.timed_out);
        r
    }

    #[tokio::test]
    async fn exit_codes_output_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let never = CancellationToken::new();
        let mut chunks = String::new();
        let r = run_step(
            &step("echo out; echo err >&2; exit 3", dir.path()),
            &never,
            |_, s| chunks.push_str(s),
        )
        .await;
        assert_eq!(
            (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
            (3, "out\n", "err\n")
        );
        assert!(chunks.contains("out") && chunks.contains("err"));

        let r = run_step(
            &step("head -c 5000 /dev/zero | tr '\\0' x", dir.path()),
            &never,
            |_, _| {},
        )
        .await;
        assert_eq!(r.stdout.len(), 1024);
        assert!(r.stdout_truncated && !r.stderr_truncated);
    }

    #[tokio::test]
    async fn a_job_sees_only_its_own_environment() {
        let dir = tempfile::tempdir().unwrap();
        // This test process has many variables (CARGO_*, its own HOME...): none may show.
        let base = vec![
            ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
            ("ALLOWED".to_owned(), "yes".to_owned()),
        ];
        let env = vec![("PM_TASK_ID".to_owned(), "t1".to_owned())];
        let s = Step {
            base_env: &base,
            env: &env,
            ..step("env | sort", dir.path())
        };
        let r = run_step(&s, &CancellationToken::new(), |_, _| {}).await;
        let mut names: Vec<&str> = r
            .stdout
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        // sh itself may add PWD, SHLVL and `_`; nothing of this test process's environment.
        names.retain(|n| !["PWD", "SHLVL", "_", "OLDPWD"].contains(n));
        assert_eq!(
            names,
            ["ALLOWED", "HOME", "PATH", STEP_ID_VAR, "PM_TASK_ID"],
            "{}",
            r.stdout
        );
        assert!(r.stdout.contains(&format!("HOME={}", dir.path().display())));
    }

    #[tokio::test]
    async fn descendants_that_left_the_group_die_with_the_step() {
        let dir = tempfile::tempdir().unwrap();
        // One escapes into its own session and would outlive a timeout; another is left
        // running, in its own session, by a step that ends well.
        let command = "setsid sh -c 'echo $$ > escaped.pid; exec sleep 60' & \
                       while [ ! -s escaped.pid ]; do :; done; echo ready; sleep 60";
        timed_out_after_ready(command, dir.path()).await;
        let command = "setsid sh -c 'echo $$ > daemon.pid; exec sleep 60' > /dev/null 2>&1 & \
                       while [ ! -s daemon.pid ]; do :; done";
        let r = run_step(
            &step(command, dir.path()),
            &CancellationToken::new(),
            |_, _| {},
        )
        .await;
        assert_eq!(r.exit_code, 0, "{r:?}");
        for file in ["escaped.pid", "daemon.pid"] {
            dies(&dir.path().join(file), Duration::from_secs(10)).await;
        }
    }

    /// Waits (`limit` at most) for the process whose pid `pid_file` holds to be gone.
    async fn dies(pid_file: &Path, limit: Duration) {
        let pid: i32 = std::fs::read_to_string(pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + limit;
        while !gone(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: {pid} outlived its step",
                pid_file.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether a process is gone: no such pid, or a zombie waiting for its reaper.
    fn gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // The state is the field after the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group_background_children_included() {
        let dir = tempfile::tempdir().unwrap();
        // A background child records its pid, then would outlive the step by far.
        let command = "sh -c 'echo $$ > child.pid; exec sleep 60' & \
                       while [ ! -s child.pid ]; do :; done; echo ready; sleep 60";
        let r = timed_out_after_ready(command, dir.path()).await;
        assert_ne!(r.exit_code, 0);
        assert!(r.stderr.contains("timeout"), "{}", r.stderr);
        dies(&dir.path().join("child.pid"), Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn cancel_stops_a_running_step() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        let r = run_step(
            &step("echo started; sleep 60", dir.path()),
            &cancel,
            move |_, out| {
                if out.contains("started") {
                    trigger.cancel();
                }
            },
        )
        .await;
        assert!(!r.timed_out);
        assert_ne!(r.exit_code, 0);
        assert!(r.stderr.contains("cancelled"), "{}", r.stderr);
    }
}
