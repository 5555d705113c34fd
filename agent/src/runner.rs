//! The runner: one task from spec to [`TaskResult`].
//!
//! Stages run in order; the jobs of a stage run in parallel. A job's commands run in order
//! and the first failing one fails the attempt; a failed attempt is retried (`retries`) after
//! an exponential backoff with jitter. A failed job that is not `allow_failure` fails the task:
//! its running siblings in the same stage are let finish (their results are reported), and
//! no later stage starts. Every task gets its own work directory, removed afterwards.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use pm_proto::unix_ms;
use pm_proto::v1::{
    Job, JobResult, OutputChunk, OutputStream, PipelineSpec, StepFinished, StepRef, StepResult,
    StepStarted, TaskEvent, TaskResult, task_event,
};
use pm_spec::{ResolvedParams, env_name, render};

use crate::executor::{self, Step};
use crate::sidecar::{self, Sidecars};
use crate::work_mount::{Binding, WorkMount};

/// How the agent runs tasks.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Where per-task work directories are made (`/mnt/pipe` in a pod).
    pub work_root: PathBuf,
    /// Bytes of stdout and of stderr kept per step.
    pub output_limit: usize,
    /// Bytes of stdout and stderr kept per task, over all its steps; the rest is cut (and
    /// marked truncated), so a task's result always fits in one message.
    pub task_output_limit: usize,
    /// Between SIGTERM and SIGKILL of a step's process group.
    pub kill_grace: Duration,
    /// Keep the work directory of a failed task for inspection.
    pub keep_failed_work_dirs: bool,
    /// First retry backoff; doubles per attempt, capped at 30 s, with ±50% jitter.
    pub retry_backoff: Duration,
    /// Executors in their own containers, by name: jobs on them run through the exec-server
    /// at the socket. Other executors run on the agent's host.
    pub sidecars: Sidecars,
    /// Variables of the agent's environment that jobs on the host may see (besides PATH);
    /// no other is passed. Sidecar jobs get their exec-server's own allowlist instead.
    pub pass_env: Vec<String>,
    /// How host jobs see their work directory (at `/mnt/pipe`, see [`WorkMount::probe`]).
    pub work_mount: WorkMount,
    /// Bytes of `output.data` a task's result may carry (at most [`MAX_OUTPUT_DATA`]).
    pub output_data_limit: usize,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            work_root: std::env::temp_dir().join("pm-work"),
            output_limit: 1024 * 1024,
            task_output_limit: TASK_OUTPUT_LIMIT,
            kill_grace: Duration::from_secs(5),
            keep_failed_work_dirs: false,
            retry_backoff: Duration::from_millis(500),
            sidecars: Sidecars::new(),
            pass_env: Vec::new(),
            work_mount: WorkMount::Off,
            output_data_limit: OUTPUT_DATA_LIMIT,
        }
    }
}

/// Output a task's result keeps by default: 3 MiB, a MiB under the 4 MiB message limit for
/// the commands and the rest. A result past the limit could not be sent: the task would be
/// run again every lease, each attempt resetting the agent's stream.
pub const TASK_OUTPUT_LIMIT: usize = 3 * 1024 * 1024;

/// The task's input document in its work directory, written before the first job.
pub const INPUT_FILE: &str = "input.data";
/// The document a job may leave in the work directory: the result's `output`.
pub const OUTPUT_FILE: &str = "output.data";
/// `output.data` a result carries by default.
pub const OUTPUT_DATA_LIMIT: usize = 1024 * 1024;
/// The most `--output-data-bytes` may allow: the steps' output keeps what is left of
/// [`TASK_OUTPUT_LIMIT`] after it, and a result must fit in one message.
pub const MAX_OUTPUT_DATA: usize = 2 * 1024 * 1024;

/// The JSON document a job left in `output.data`, if any. Opened without following a
/// symlink and only if it is a regular file: a job (perhaps in another container) must not
/// make the agent read its own files or block on a FIFO.
async fn read_output(work_dir: &Path, limit: usize) -> Result<Option<prost_types::Value>, String> {
    use tokio::io::AsyncReadExt;
    let path = work_dir.join(OUTPUT_FILE);
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = match tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(&path)
        .await
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{OUTPUT_FILE} cannot be read: {e}")),
    };
    let meta = file
        .metadata()
        .await
        .map_err(|e| format!("{OUTPUT_FILE}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{OUTPUT_FILE} is not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("{OUTPUT_FILE} cannot be read: {e}"))?;
    if bytes.len() > limit {
        return Err(format!(
            "{OUTPUT_FILE} is larger than the {limit} bytes a result may carry (--output-data-bytes)"
        ));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{OUTPUT_FILE} is not JSON: {e}"))?;
    // On the wire a JSON number takes 11 bytes however short its text: the bound holds for
    // the encoding too, so the result always fits in its message.
    let output = pm_proto::json::from_json(json);
    let encoded = prost::Message::encoded_len(&output);
    if encoded > limit {
        return Err(format!(
            "{OUTPUT_FILE} takes {encoded} bytes encoded, more than the {limit} a result may carry (--output-data-bytes)"
        ));
    }
    Ok(Some(output))
}

/// Cuts the steps' output, in run order, to `limit` bytes in all: what comes after is dropped
/// and the step marked truncated (its live output was streamed to watchers as it came).
fn fit_output(result: &mut TaskResult, limit: usize) {
    let mut left = limit;
    for step in result.jobs.iter_mut().flat_map(|j| j.steps.iter_mut()) {
        for (text, truncated) in [
            (&mut step.stdout, &mut step.stdout_truncated),
            (&mut step.stderr, &mut step.stderr_truncated),
        ] {
            if text.len() <= left {
                left -= text.len();
                continue;
            }
            let mut end = left;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            *truncated = true;
            left = 0;
        }
    }
}

/// One task to run.
pub struct Run {
    /// Names the work directory; unique per task (and attempt, for the scheduler).
    pub id: String,
    pub spec: Arc<PipelineSpec>,
    pub params: ResolvedParams,
    /// Seconds the whole task may take; 0 means no limit.
    pub timeout_seconds: u32,
    /// The input document as JSON text, written to `input.data`.
    pub input: Option<String>,
    /// The W3C trace context the task was submitted in ("" for none): each step's
    /// `TRACEPARENT` names its own span in that trace, or is this one when not tracing.
    pub traceparent: String,
}

/// Events of a running task go here (step started/finished, output).
pub type Events = mpsc::UnboundedSender<TaskEvent>;

fn emit(events: &Events, e: task_event::Event) {
    let _ = events.send(TaskEvent {
        time_ms: unix_ms(),
        event: Some(e),
    });
}

fn failed(step: &StepResult) -> bool {
    step.exit_code != 0 || step.timed_out || step.signal != 0
}

/// Runs a task to its end. Cancelling `cancel` kills whatever runs and ends it in failure.
pub async fn run_task(
    options: &RunnerOptions,
    run: Run,
    events: Events,
    cancel: CancellationToken,
) -> TaskResult {
    let started = Instant::now();
    let task_deadline = (run.timeout_seconds > 0)
        .then(|| started + Duration::from_secs(run.timeout_seconds.into()));
    // Absolute: a step enters its work directory before it mounts it at a fixed path, so a
    // relative one (`pm dev`'s default data dir is `pm-data`) would be looked for inside
    // itself, and no command could start.
    let root =
        std::path::absolute(&options.work_root).unwrap_or_else(|_| options.work_root.clone());
    let work_dir = options.work_mount.work_dir(root.join(sanitize(&run.id)));
    let mount = options.work_mount.binding(&work_dir);
    let mut result = TaskResult {
        succeeded: true,
        ..TaskResult::default()
    };
    if let Err(e) = make_work_dir(&options.work_mount, &work_dir).await {
        result.succeeded = false;
        result.error = format!("cannot make work directory {}: {e}", work_dir.display());
        return result;
    }
    if let Some(input) = &run.input
        && let Err(e) = tokio::fs::write(work_dir.join(INPUT_FILE), input).await
    {
        result.succeeded = false;
        result.error = format!("cannot write {INPUT_FILE}: {e}");
        let _ = remove_work_dir(&options.work_mount, &work_dir).await;
        return result;
    }
    'stages: for stage in &run.spec.stages {
        let jobs = stage.jobs.iter().map(|job| {
            let span = tracing::info_span!(
                "job",
                otel.name = %format_args!("job {}/{}", stage.name, job.name),
                stage = %stage.name,
                job = %job.name,
                executor = %job.executor,
                otel.status_code = tracing::field::Empty,
            );
            run_job(
                options,
                &run,
                &stage.name,
                job,
                &work_dir,
                mount.as_ref(),
                task_deadline,
                &events,
                &cancel,
            )
            .instrument(span)
        });
        for job_result in join_all(jobs).await {
            let fatal = !job_result.succeeded && !job_result.allowed_failure;
            if fatal && result.succeeded {
                result.succeeded = false;
                result.error = describe_failure(&job_result, &cancel, task_deadline);
            }
            result.jobs.push(job_result);
        }
        if !result.succeeded {
            break 'stages;
        }
    }
    let limit = options.output_data_limit.min(MAX_OUTPUT_DATA);
    match read_output(&work_dir, limit).await {
        Ok(output) => result.output = output,
        Err(e) if result.succeeded => {
            result.succeeded = false;
            result.error = e;
        }
        Err(_) => {} // the task failed already, and says why
    }
    result.duration_ms = started.elapsed().as_millis() as u64;
    // The output document and the steps' output share the result's budget.
    let output_len = result
        .output
        .as_ref()
        .map_or(0, prost::Message::encoded_len);
    fit_output(
        &mut result,
        options.task_output_limit.saturating_sub(output_len),
    );
    if (result.succeeded || !options.keep_failed_work_dirs)
        && let Err(e) = remove_work_dir(&options.work_mount, &work_dir).await
    {
        tracing::warn!(dir = %work_dir.display(), error = %e, "work directory not removed");
    }
    result
}

/// A task's work directory, made empty: an exclusive one is emptied of what the last task
/// left (kept for inspection, or not removable then).
async fn make_work_dir(mount: &WorkMount, dir: &Path) -> std::io::Result<()> {
    if matches!(mount, WorkMount::Exclusive { .. }) {
        remove_work_dir(mount, dir).await?;
    }
    tokio::fs::create_dir_all(dir).await
}

/// Removes a task's work directory; an exclusive one (the mount point) only loses its
/// contents.
async fn remove_work_dir(mount: &WorkMount, dir: &Path) -> std::io::Result<()> {
    if !matches!(mount, WorkMount::Exclusive { .. }) {
        return tokio::fs::remove_dir_all(dir).await;
    }
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        if entry.file_type().await?.is_dir() {
            tokio::fs::remove_dir_all(&path).await?;
        } else {
            tokio::fs::remove_file(&path).await?;
        }
    }
    Ok(())
}

fn describe_failure(
    job: &JobResult,
    cancel: &CancellationToken,
    task_deadline: Option<Instant>,
) -> String {
    let what = format!("job {}/{}", job.stage, job.job);
    if cancel.is_cancelled() {
        return format!("{what} stopped: task cancelled");
    }
    if task_deadline.is_some_and(|d| Instant::now() >= d) {
        return format!("{what} stopped: task timed out");
    }
    match job.steps.iter().enumerate().find(|(_, s)| failed(s)) {
        Some((i, s)) if s.timed_out => format!("{what} timed out in step {i}"),
        Some((i, s)) if s.signal != 0 => {
            format!("{what} failed: step {i} killed by signal {}", s.signal)
        }
        Some((i, s)) => format!("{what} failed: step {i} exited with code {}", s.exit_code),
        None => format!("{what} failed"),
    }
}

/// A task id as one safe path segment.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)] // the job's whole context; a struct would only rename it
async fn run_job(
    options: &RunnerOptions,
    run: &Run,
    stage: &str,
    job: &Job,
    work_dir: &Path,
    mount: Option<&Binding>,
    task_deadline: Option<Instant>,
    events: &Events,
    cancel: &CancellationToken,
) -> JobResult {
    let started = Instant::now();
    // Job parameters override the task's.
    let mut params = run.params.clone();
    params.extend(job.params.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut env: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (env_name(k), v.clone()))
        .collect();
    env.push(("PM_TASK_ID".into(), run.id.clone()));
    // Sidecars run their steps where the agent made the directory (no binding there).
    let mount = mount.filter(|_| !options.sidecars.contains_key(&job.executor));
    let visible_dir = mount.map_or(work_dir, Binding::target);
    env.push(("PM_WORK_DIR".into(), visible_dir.display().to_string()));
    env.push(("PM_STAGE".into(), stage.to_owned()));
    env.push(("PM_JOB".into(), job.name.clone()));
    let base_env = crate::executor::base_env(&options.pass_env);

    let mut result = JobResult {
        stage: stage.to_owned(),
        job: job.name.clone(),
        executor: job.executor.clone(),
        allowed_failure: false,
        ..JobResult::default()
    };
    let attempts = job.retries + 1;
    for attempt in 1..=attempts {
        result.attempts = attempt;
        result.steps.clear();
        let job_deadline = (job.timeout_seconds > 0)
            .then(|| Instant::now() + Duration::from_secs(job.timeout_seconds.into()));
        let deadline = match (job_deadline, task_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut ok = true;
        for (i, template) in job.commands.iter().enumerate() {
            let step_ref = StepRef {
                stage: stage.to_owned(),
                job: job.name.clone(),
                step: i as u32,
                job_attempt: attempt,
            };
            let command = match render(template, |name| params.get(name).map(String::as_str)) {
                Ok(c) => c,
                Err(v) => {
                    // Unreachable for validated specs; reported like a shell would.
                    result.steps.push(StepResult {
                        command: template.clone(),
                        exit_code: 127,
                        stderr: v.to_string(),
                        ..StepResult::default()
                    });
                    ok = false;
                    break;
                }
            };
            emit(
                events,
                task_event::Event::StepStarted(StepStarted {
                    step: Some(step_ref.clone()),
                    command: command.clone(),
                }),
            );
            let span = tracing::info_span!(
                "step",
                otel.name = %format_args!("step {i}"),
                step = i,
                job_attempt = attempt,
                command = %template,
                exit_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            // The step's own span, so what the command traces joins the task's trace.
            let mut env = env.clone();
            if let Some(traceparent) = pm_proto::trace::traceparent_for(&span, &run.traceparent) {
                env.push((pm_proto::trace::TRACEPARENT_ENV.into(), traceparent));
            }
            let step = Step {
                command: &command,
                work_dir,
                base_env: &base_env,
                env: &env,
                deadline,
                output_limit: options.output_limit,
                kill_grace: options.kill_grace,
                mount,
            };
            let on_output = |stream: OutputStream, data: &str| {
                emit(
                    events,
                    task_event::Event::Output(OutputChunk {
                        step: Some(step_ref.clone()),
                        stream: stream as i32,
                        data: data.to_owned(),
                    }),
                );
            };
            let step_result = match options.sidecars.get(&job.executor) {
                Some(socket) => {
                    sidecar::run_step(socket, &step, cancel, on_output)
                        .instrument(span.clone())
                        .await
                }
                None => {
                    executor::run_step(&step, cancel, on_output)
                        .instrument(span.clone())
                        .await
                }
            };
            span.record("exit_code", step_result.exit_code);
            if failed(&step_result) {
                span.record("otel.status_code", "ERROR");
            }
            drop(span);
            emit(
                events,
                task_event::Event::StepFinished(StepFinished {
                    step: Some(step_ref),
                    result: Some(step_result.clone()),
                }),
            );
            let step_failed = failed(&step_result);
            result.timed_out = step_result.timed_out;
            result.steps.push(step_result);
            if step_failed {
                ok = false;
                break;
            }
        }
        if ok {
            result.succeeded = true;
            break;
        }
        let out_of_time = task_deadline.is_some_and(|d| Instant::now() >= d);
        if attempt == attempts || cancel.is_cancelled() || out_of_time {
            break;
        }
        let backoff = backoff(options.retry_backoff, attempt);
        tracing::info!(stage, job = %job.name, attempt, ?backoff, "job failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => break,
        }
    }
    result.allowed_failure = !result.succeeded && job.allow_failure;
    result.duration_ms = started.elapsed().as_millis() as u64;
    if !result.succeeded {
        tracing::Span::current().record("otel.status_code", "ERROR");
    }
    result
}

/// `base * 2^(attempt-1)`, capped at 30 s, times a random factor in [0.5, 1.5).
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << (attempt - 1).min(16));
    let capped = exp.min(Duration::from_secs(30));
    capped.mul_f64(rand::rng().random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use pm_proto::v1::Stage;

    use super::*;

    fn job(name: &str, commands: &[&str]) -> Job {
        Job {
            name: name.into(),
            executor: "host".into(),
            commands: commands.iter().map(|c| c.to_string()).collect(),
            ..Job::default()
        }
    }

    async fn run(
        spec: PipelineSpec,
        params: &[(&str, &str)],
    ) -> (TaskResult, Vec<TaskEvent>, PathBuf) {
        let root = tempfile::tempdir().unwrap().keep();
        let options = RunnerOptions {
            work_root: root.clone(),
            retry_backoff: Duration::from_millis(1),
            ..RunnerOptions::default()
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let result = run_task(
            &options,
            Run {
                id: "t1".into(),
                spec: Arc::new(spec),
                params: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                timeout_seconds: 0,
                input: None,
                traceparent: String::new(),
            },
            tx,
            CancellationToken::new(),
        )
        .await;
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        (result, events, root)
    }

    /// `input.data` is there before the first job; `output.data` becomes the result's
    /// output, and one that is not JSON, too large, a symlink or a FIFO ends the task ERROR
    /// saying why, without reading through it or blocking.
    /// A relative work root (what `pm dev`'s default `--data-dir pm-data` gives) still runs
    /// commands with the work directory mounted at a fixed path: the mount's source was
    /// taken relative to the step's own directory, and every command failed with "cannot
    /// start sh".
    #[tokio::test]
    async fn a_relative_work_root_runs_commands_under_a_mount() {
        let root = tempfile::tempdir_in(".").unwrap();
        let relative = PathBuf::from(root.path().file_name().unwrap());
        assert!(relative.is_relative());
        let at = tempfile::tempdir().unwrap();
        let work_mount = WorkMount::probe(&at.path().join("pipe"), &relative);
        if work_mount == WorkMount::Off {
            // Not root, or user namespaces are off here: no mount to take a source for.
            eprintln!("no private mount here; skipped");
            return;
        }
        let options = RunnerOptions {
            work_root: relative,
            work_mount,
            ..RunnerOptions::default()
        };
        let run = Run {
            id: "t1".into(),
            spec: Arc::new(PipelineSpec {
                stages: vec![Stage {
                    name: "s".into(),
                    jobs: vec![job("j", &["echo hi > out.txt", "test -s out.txt"])],
                    priority: None,
                }],
                ..PipelineSpec::default()
            }),
            params: ResolvedParams::new(),
            timeout_seconds: 0,
            input: None,
            traceparent: String::new(),
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        let result = run_task(&options, run, tx, CancellationToken::new()).await;
        assert!(result.succeeded, "{result:?}");
    }

    #[tokio::test]
    async fn input_data_goes_in_and_output_data_comes_out_bounded() {
        let one = |commands: &[&str]| PipelineSpec {
            stages: vec![Stage {
                name: "s".into(),
                jobs: vec![job("j", commands)],
                priority: None,
            }],
            ..PipelineSpec::default()
        };
        let run_with = |spec: PipelineSpec, input: Option<&str>, limit: usize| {
            let input = input.map(str::to_owned);
            async move {
                let root = tempfile::tempdir().unwrap();
                let options = RunnerOptions {
                    work_root: root.path().to_owned(),
                    output_data_limit: limit,
                    ..RunnerOptions::default()
                };
                let run = Run {
                    id: "t1".into(),
                    spec: Arc::new(spec),
                    params: ResolvedParams::new(),
                    timeout_seconds: 0,
                    input,
                    traceparent: String::new(),
                };
                let (tx, _rx) = mpsc::unbounded_channel();
                run_task(&options, run, tx, CancellationToken::new()).await
            }
        };
        let echo = one(&["sed 's/in/out/' input.data > output.data"]);
        let result = run_with(echo, Some(r#"{"in":[1,2]}"#), 1024).await;
        assert!(result.succeeded, "{result:?}");
        let output = pm_proto::json::to_json(result.output.as_ref().unwrap());
        assert_eq!(output, Some(serde_json::json!({ "out": [1, 2] })));

        let none = run_with(one(&["test ! -e input.data"]), None, 1024).await;
        assert!(none.succeeded && none.output.is_none(), "{none:?}");

        for (commands, limit, error) in [
            (
                &["echo 'not json' > output.data"][..],
                1024,
                "output.data is not JSON",
            ),
            (
                &["printf '[%0100d]' 0 > output.data"][..],
                64,
                "larger than the 64 bytes",
            ),
            (
                &[
                    "awk 'BEGIN { printf \"[\"; for (i = 0; i < 100; i++) printf \"1,\"; print \"1]\" }' > output.data",
                ][..],
                512,
                "bytes encoded, more than the 512",
            ),
            (
                &["ln -s /etc/hostname output.data"][..],
                1024,
                "cannot be read",
            ),
            (&["mkfifo output.data"][..], 1024, "not a regular file"),
        ] {
            let result = run_with(one(commands), None, limit).await;
            assert!(!result.succeeded && result.output.is_none(), "{result:?}");
            assert!(
                result.error.contains(error),
                "{commands:?}: {}",
                result.error
            );
        }
    }

    #[tokio::test]
    async fn stages_share_the_work_dir_and_params_are_quoted() {
        let spec = PipelineSpec {
            stages: vec![
                Stage {
                    name: "a".into(),
                    jobs: vec![job(
                        "w",
                        &["printf %s {{v}} > f", "test \"$PM_PARAM_V\" = \"$(cat f)\""],
                    )],
                    priority: None,
                },
                Stage {
                    name: "b".into(),
                    jobs: vec![job("r", &["cat f"])],
                    priority: None,
                },
            ],
            ..PipelineSpec::default()
        };
        let (result, events, root) = run(spec, &[("v", "$(echo pwned) ; `id`")]).await;
        assert!(result.succeeded, "{result:?}");
        assert_eq!(result.jobs[1].steps[0].stdout, "$(echo pwned) ; `id`");
        assert!(
            events
                .iter()
                .any(|e| matches!(e.event, Some(task_event::Event::StepStarted(_))))
        );
        assert!(!root.join("t1").exists(), "work dir removed after the task");
    }

    /// Five steps printing a MiB each: the result keeps the first 3 MiB in run order, marks
    /// the rest cut, and fits in one message.
    #[tokio::test]
    async fn a_task_keeps_its_output_budget_over_all_steps() {
        let mib = "head -c 1048576 /dev/zero | tr '\\0' x";
        let spec = PipelineSpec {
            stages: vec![Stage {
                name: "s".into(),
                jobs: vec![job("j", &[mib; 5])],
                priority: None,
            }],
            ..PipelineSpec::default()
        };
        let (result, _, _) = run(spec, &[]).await;
        assert!(result.succeeded, "{}", result.error);
        let kept: Vec<(usize, bool)> = result.jobs[0]
            .steps
            .iter()
            .map(|s| (s.stdout.len(), s.stdout_truncated))
            .collect();
        let whole = (1024 * 1024, false);
        assert_eq!(kept, [whole, whole, whole, (0, true), (0, true)]);
        assert!(prost::Message::encoded_len(&result) < pm_proto::MAX_MESSAGE_BYTES);
    }

    /// The task's own timeout reaches a step of any job, and nothing runs after it.
    #[tokio::test]
    async fn the_task_timeout_kills_the_running_step_and_ends_the_task() {
        let root = tempfile::tempdir().unwrap();
        let options = RunnerOptions {
            work_root: root.path().to_owned(),
            kill_grace: Duration::from_millis(200),
            ..RunnerOptions::default()
        };
        let spec = PipelineSpec {
            stages: vec![
                Stage {
                    name: "slow".into(),
                    jobs: vec![job("sleeps", &["sleep 60"])],
                    priority: None,
                },
                Stage {
                    name: "after".into(),
                    jobs: vec![job("never", &["true"])],
                    priority: None,
                },
            ],
            ..PipelineSpec::default()
        };
        let (tx, _rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let run = Run {
            id: "t-timeout".into(),
            spec: Arc::new(spec),
            params: Default::default(),
            timeout_seconds: 1,
            input: None,
            traceparent: String::new(),
        };
        let result = run_task(&options, run, tx, CancellationToken::new()).await;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "killed well before 60 s"
        );
        assert!(!result.succeeded);
        assert_eq!(
            result.jobs.len(),
            1,
            "no stage after the timeout: {result:?}"
        );
        let step = &result.jobs[0].steps[0];
        assert!(step.timed_out, "{step:?}");
    }

    #[tokio::test]
    async fn siblings_of_a_failed_job_finish_and_no_later_stage_starts() {
        let spec = PipelineSpec {
            stages: vec![
                Stage {
                    name: "one".into(),
                    jobs: vec![
                        job("fails", &["exit 2"]),
                        job("sibling", &["sleep 0.3", "echo finished"]),
                    ],
                    priority: None,
                },
                Stage {
                    name: "two".into(),
                    jobs: vec![job("never", &["true"])],
                    priority: None,
                },
            ],
            ..PipelineSpec::default()
        };
        let (result, _, _) = run(spec, &[]).await;
        assert!(!result.succeeded);
        assert_eq!(result.jobs.len(), 2, "stage two never started");
        let sibling = &result.jobs[1];
        assert!(sibling.succeeded, "the sibling ran to its end: {sibling:?}");
        assert_eq!(sibling.steps[1].stdout, "finished\n");
    }

    #[tokio::test]
    async fn retries_allow_failure_and_stopping_after_a_failed_stage() {
        let mut flaky = job(
            "flaky",
            &["n=$(cat n 2>/dev/null || echo 0); echo $((n+1)) > n; [ $n -ge 2 ]"],
        );
        flaky.retries = 3;
        let mut tolerated = job("tolerated", &["exit 4"]);
        tolerated.allow_failure = true;
        let spec = PipelineSpec {
            stages: vec![
                Stage {
                    name: "one".into(),
                    jobs: vec![flaky, tolerated],
                    priority: None,
                },
                Stage {
                    name: "two".into(),
                    jobs: vec![job("fails", &["echo no >&2; exit 7", "echo never"])],
                    priority: None,
                },
                Stage {
                    name: "three".into(),
                    jobs: vec![job("skipped", &["true"])],
                    priority: None,
                },
            ],
            ..PipelineSpec::default()
        };
        let (result, _, _) = run(spec, &[]).await;
        assert!(!result.succeeded);
        assert_eq!(result.jobs.len(), 3, "stage three never ran");
        assert_eq!(
            (result.jobs[0].succeeded, result.jobs[0].attempts),
            (true, 3)
        );
        assert!(result.jobs[1].allowed_failure);
        let fails = &result.jobs[2];
        assert_eq!(
            fails.steps.len(),
            1,
            "commands after the failing one do not run"
        );
        assert_eq!(
            (fails.steps[0].exit_code, fails.steps[0].stderr.as_str()),
            (7, "no\n")
        );
        assert_eq!(
            result.error,
            "job two/fails failed: step 0 exited with code 7"
        );
    }
}
