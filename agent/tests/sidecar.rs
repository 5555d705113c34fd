//! Jobs on a sidecar executor run in a real `pm-agent exec-server` process, reached over a
//! Unix socket, in the work directory shared with the agent; timeouts and cancels reach the
//! sidecar's process group; an unreachable sidecar is a step that could not start.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use pm_agent::runner::{Run, RunnerOptions, run_task};
use pm_proto::v1::{Job, ParamSpec, PipelineSpec, Stage, TaskResult};

struct ExecServer(Child);

impl Drop for ExecServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exec_server(socket: &Path, work_root: &Path, extra: &[&str]) -> ExecServer {
    std::fs::create_dir_all(work_root).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pm-agent"))
        .arg("exec-server")
        .arg("--socket")
        .arg(socket)
        .arg("--work-root")
        .arg(work_root)
        .args(extra)
        .env("PM_TEST_SECRET", "leaked")
        .env("PM_TEST_ALLOWED", "passed")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "exec-server never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    ExecServer(child)
}

fn job(name: &str, executor: &str, commands: &[&str]) -> Job {
    Job {
        name: name.into(),
        executor: executor.into(),
        commands: commands.iter().map(|c| c.to_string()).collect(),
        ..Job::default()
    }
}

async fn run(options: &RunnerOptions, jobs: Vec<Job>, cancel: CancellationToken) -> TaskResult {
    let spec = PipelineSpec {
        params: [("v".to_owned(), ParamSpec::default())].into(),
        stages: vec![Stage {
            name: "s".into(),
            jobs,
            priority: None,
        }],
        ..PipelineSpec::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Drain events so the run never waits on them.
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let run = Run {
        id: format!("t{}", rand_id()),
        spec: Arc::new(spec),
        params: [("v".to_owned(), "a b; $(touch pwned)".to_owned())].into(),
        timeout_seconds: 0,
        input: None,
        traceparent: String::new(),
    };
    run_task(options, run, tx, cancel).await
}

fn rand_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// Waits (10 s at most) for the process whose pid `pid_file` holds to be gone.
async fn dies(pid_file: &Path, what: &str) {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .unwrap_or_else(|e| panic!("{what} never wrote {}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(pid) {
        assert!(Instant::now() < deadline, "{what} {pid} outlived its step");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_on_a_sidecar_executor_run_in_the_exec_server() {
    let dir = tempfile::tempdir().unwrap();
    // In a directory no one made yet, as on a fresh emptyDir.
    let socket = dir.path().join(".sockets/wget.sock");
    let _server = exec_server(&socket, &dir.path().join("work"), &[]);
    let options = RunnerOptions {
        work_root: dir.path().join("work"),
        kill_grace: Duration::from_millis(300),
        sidecars: [("wget".to_owned(), socket.clone())].into(),
        ..RunnerOptions::default()
    };

    let result = run(
        &options,
        vec![
            job(
                "fetch",
                "wget",
                &[
                    "printf %s \"$PM_SIDECAR_SOCKET\" > where",
                    "cat where",
                    "printf %s {{v}}",
                ],
            ),
            job(
                "local",
                "host",
                &["printf %s \"${PM_SIDECAR_SOCKET:-host}\""],
            ),
        ],
        CancellationToken::new(),
    )
    .await;
    assert!(result.succeeded, "{result:?}");
    let fetch = &result.jobs[0];
    assert_eq!(
        fetch.steps[1].stdout,
        socket.display().to_string(),
        "ran in the sidecar"
    );
    assert_eq!(
        fetch.steps[2].stdout, "a b; $(touch pwned)",
        "parameters stay quoted"
    );
    assert_eq!(
        result.jobs[1].steps[0].stdout, "host",
        "other executors run on the host"
    );
    assert!(!options.work_root.join("pwned").exists());

    // A timeout kills the sidecar's process tree: the background child too.
    let slow_pid = dir.path().join("slow.pid");
    let command = format!(
        "sh -c 'echo $$ > {}; exec sleep 60' & sleep 60",
        slow_pid.display()
    );
    let mut slow = job("slow", "wget", &[&command]);
    slow.timeout_seconds = 5;
    let started = Instant::now();
    let result = run(&options, vec![slow], CancellationToken::new()).await;
    let step = &result.jobs[0].steps[0];
    assert!(step.timed_out, "{step:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    dies(&slow_pid, "the timed-out step's child").await;

    // A cancel does too: the agent drops the call, the exec-server kills the group.
    let marker = dir.path().join("cancelled.pid");
    let command = format!(
        "sh -c 'echo $$ > {}; exec sleep 60' & wait",
        marker.display()
    );
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watcher = {
        let marker = marker.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            // The pid written whole (the shell makes the file before it writes to it; a
            // cancel between the two left an empty file here once).
            let written =
                |path: &Path| std::fs::read_to_string(path).is_ok_and(|pid| pid.ends_with('\n'));
            while !written(&marker) {
                assert!(
                    Instant::now() < deadline,
                    "the cancelled step never started"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            trigger.cancel();
        })
    };
    let result = run(&options, vec![job("long", "wget", &[&command])], cancel).await;
    watcher.await.unwrap();
    assert!(!result.succeeded);
    dies(&marker, "the cancelled command").await;
}

/// `exec-server --work-dir-at`: each step sees its task's directory at the mount point (as
/// `/mnt/pipe` in a pod), concurrent tasks each their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_binds_each_tasks_directory_at_the_mount_point() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, pipe) = (dir.path().join("tess.sock"), dir.path().join("pipe"));
    std::fs::create_dir(&pipe).unwrap();
    let at = ["--work-dir-at", pipe.to_str().unwrap()];
    let _server = exec_server(&socket, &dir.path().join("work"), &at);
    let options = RunnerOptions {
        work_root: dir.path().join("work"),
        sidecars: [("tesseract".to_owned(), socket.clone())].into(),
        ..RunnerOptions::default()
    };
    let p = pipe.display();
    let task = |n: u32| {
        let commands = [
            format!("echo {n} > {p}/mine"),
            "sleep 0.3".to_owned(),
            format!("cat {p}/mine; ls {p}; echo $PM_WORK_DIR"),
        ];
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        let job = job("ocr", "tesseract", &commands);
        let options = options.clone();
        async move { run(&options, vec![job], CancellationToken::new()).await }
    };
    let (a, b) = tokio::join!(task(1), task(2));
    for (n, result) in [(1, a), (2, b)] {
        assert!(result.succeeded, "{result:?}");
        let seen = &result.jobs[0].steps[2].stdout;
        assert_eq!(seen, &format!("{n}\nmine\n{p}\n"), "task {n}");
    }
    assert_eq!(
        std::fs::read_dir(&pipe).unwrap().count(),
        0,
        "nothing at the host's"
    );
}

#[tokio::test]
async fn an_unreachable_sidecar_is_a_step_that_could_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let options = RunnerOptions {
        work_root: dir.path().join("work"),
        sidecars: [("wget".to_owned(), dir.path().join("nobody.sock"))].into(),
        ..RunnerOptions::default()
    };
    let result = run(
        &options,
        vec![job("fetch", "wget", &["true"])],
        CancellationToken::new(),
    )
    .await;
    assert!(!result.succeeded);
    let step = &result.jobs[0].steps[0];
    assert_eq!(step.exit_code, 127);
    assert!(step.stderr.contains("nobody.sock"), "{}", step.stderr);
}

/// An agent takes no work before its sidecars listen: the wait ends only once every socket
/// accepts a connection, or at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_waits_for_its_sidecars_to_listen() {
    let dir = tempfile::tempdir().unwrap();
    let (wget, tesseract) = (dir.path().join("wget.sock"), dir.path().join("ocr.sock"));
    let sidecars: pm_agent::sidecar::Sidecars = [
        ("wget".to_owned(), wget.clone()),
        ("tesseract".to_owned(), tesseract.clone()),
    ]
    .into();
    let shutdown = CancellationToken::new();
    let waiting = {
        let (sidecars, shutdown) = (sidecars.clone(), shutdown.clone());
        tokio::spawn(async move {
            pm_agent::sidecar::wait_until_reachable(&sidecars, &shutdown).await;
        })
    };
    let _wget = exec_server(&wget, &dir.path().join("work"), &[]);
    // One of two listening is not enough (checked over several of its 100 ms rounds).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "returned with tesseract not listening"
    );
    let _tesseract = exec_server(&tesseract, &dir.path().join("work"), &[]);
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("returned once both listen")
        .unwrap();

    // With one never listening, shutdown ends the wait.
    let never: pm_agent::sidecar::Sidecars =
        [("mc".to_owned(), dir.path().join("nobody.sock"))].into();
    shutdown.cancel();
    tokio::time::timeout(
        Duration::from_secs(5),
        pm_agent::sidecar::wait_until_reachable(&never, &shutdown),
    )
    .await
    .expect("shutdown ends the wait");
}

/// What an exec-server lets through its socket: only its user, only work dirs inside its
/// work root, at most its own output limit, and only the environment it allows.
#[tokio::test]
async fn the_exec_server_confines_what_it_is_asked_to_run() {
    use std::os::unix::fs::PermissionsExt;

    use hyper_util::rt::TokioIo;
    use pm_proto::internal::v1::{ExecRequest, exec_event};
    use tonic::transport::{Endpoint, Uri};

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("x.sock");
    let root = dir.path().join("work");
    let _server = exec_server(
        &socket,
        &root,
        &["--max-output-bytes", "100", "--pass-env", "PM_TEST_ALLOWED"],
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let path = socket.clone();
    let channel = Endpoint::from_static("http://sidecar")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap();
    let mut client = pm_proto::client::exec(channel);
    let task_dir = root.join("t1");
    std::fs::create_dir_all(&task_dir).unwrap();
    // An exec's result, after whatever output it streams first.
    async fn finished(
        mut events: tonic::Streaming<pm_proto::internal::v1::ExecEvent>,
    ) -> pm_proto::v1::StepResult {
        loop {
            if let Some(exec_event::Event::Finished(r)) =
                events.message().await.unwrap().unwrap().event
            {
                return r;
            }
        }
    }
    let request = |work_dir: &Path, command: &str| ExecRequest {
        command: command.into(),
        work_dir: work_dir.display().to_string(),
        env: [("PM_TASK_ID".to_owned(), "t1".to_owned())].into(),
        output_limit: u64::MAX,
        timeout_ms: 30_000,
        kill_grace_ms: 100,
    };
    for outside in [Path::new("/"), dir.path(), &root, &root.join("t1/../..")] {
        let refused = client.exec(request(outside, "true")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{outside:?}");
        assert_eq!(
            pm_proto::status::violated_field(&refused).as_deref(),
            Some("work_dir")
        );
    }
    // Inside: runs, with the output cut at the server's limit and a clean environment.
    let events = client
        .exec(request(
            &task_dir,
            "env | sort; head -c 5000 /dev/zero | tr '\\0' x",
        ))
        .await
        .unwrap()
        .into_inner();
    let result = finished(events).await;
    assert_eq!(result.stdout.len(), 100, "{result:?}");
    assert!(result.stdout_truncated);
    let events = client
        .exec(request(&task_dir, "env"))
        .await
        .unwrap()
        .into_inner();
    let result = finished(events).await;
    assert!(
        result.stdout.contains("PM_TEST_ALLOWED=passed"),
        "{}",
        result.stdout
    );
    assert!(result.stdout.contains("PM_TASK_ID=t1"));
    assert!(!result.stdout.contains("leaked"), "{}", result.stdout);
}

/// `pm-agent exec-server-ready`, an executor's startup probe: fails until the exec-server
/// listens, then succeeds.
#[test]
fn the_readiness_probe_answers_whether_the_exec_server_listens() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("wget.sock");
    let ready = || {
        Command::new(env!("CARGO_BIN_EXE_pm-agent"))
            .args(["exec-server-ready", "--socket"])
            .arg(&socket)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(ready(), Some(1));
    let server = exec_server(&socket, &dir.path().join("work"), &[]);
    assert_eq!(ready(), Some(0));
    drop(server);
    // A socket file left by a killed server accepts nothing.
    assert_eq!(ready(), Some(1));
}
