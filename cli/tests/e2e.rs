//! End to end through the public API: `pm dev` on a random loopback port, driven only by the
//! generated clients (and the real `pmctl` binary). Every wait is bounded.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;

use pm_cli::dev::{Dev, DevOptions};
use pm_proto::v1::pipeline_service_client::PipelineServiceClient;
use pm_proto::v1::task_service_client::TaskServiceClient;
use pm_proto::v1::*;

const WAIT: Duration = Duration::from_secs(60);

/// `pm dev --auth`: the authorization table and the forgeries.
#[path = "e2e/auth.rs"]
mod auth;

/// Bad input for every public RPC.
#[path = "e2e/bad_input.rs"]
mod bad_input;

/// `pmctl pipeline deploy`'s values, rendered by the pipeline chart.
#[path = "e2e/chart.rs"]
mod chart;

/// `pm dev --metrics-listen`, scraped live.
#[path = "e2e/metrics.rs"]
mod metrics;

/// A live `pm dev` process (the fixture).
#[path = "e2e/pm_dev.rs"]
mod pm_dev;

/// Traces over OTLP, received from a live `pm dev`.
#[path = "e2e/trace.rs"]
mod trace;

/// A Raspberry Pi class agent (aarch64, under qemu-user).
#[path = "e2e/pi.rs"]
mod pi;

/// The OCR pipeline pod under podman (k8s/overlays/local).
#[path = "e2e/pod.rs"]
mod pod;

/// What an idle watch costs.
#[path = "e2e/watches.rs"]
mod watches;

/// An agent's RunnerService on a loopback port (`pm-agent --runner-listen`), running
/// specs in a work root of its own.
struct RunnerServer {
    endpoint: String,
    stop: tokio_util::sync::CancellationToken,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    _work: tempfile::TempDir,
}

impl RunnerServer {
    async fn start() -> Self {
        let work = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        let options = pm_agent::RunnerOptions {
            work_root: work.path().to_owned(),
            ..pm_agent::RunnerOptions::default()
        };
        let served = pm_agent::serve_runner(listener, options, stop.clone().cancelled_owned());
        RunnerServer {
            endpoint,
            stop,
            server: tokio::spawn(served),
            _work: work,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.server.await;
    }
}

struct Harness {
    dev: Dev,
    dir: tempfile::TempDir,
    tasks: TaskServiceClient<Channel>,
    pipelines: PipelineServiceClient<Channel>,
}

async fn start() -> Harness {
    start_with_slots(4).await
}

async fn start_with_slots(slots: u32) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(DevOptions {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        sample: true,
        slots,
        auth: false,
        work_dir_at: Some(pm_agent::work_mount::DEFAULT_AT.into()),
        max_watches_per_client: pm_gateway::watch::DEFAULT_MAX_WATCHES_PER_CLIENT,
    })
    .await
    .unwrap();
    let channel = pm_proto::client::channel(&dev.endpoint()).unwrap();
    Harness {
        tasks: pm_proto::client::tasks(channel.clone()),
        pipelines: pm_proto::client::pipelines(channel),
        dev,
        dir,
    }
}

const APP: &str = "tenants/default/applications/demo";

fn pipeline_name(id: &str) -> String {
    format!("{APP}/pipelines/{id}")
}

/// The workload-scheduler document's OCR pipeline: the seeds' flat form (`{{url}}`, paths
/// under /mnt/pipe), with no `name` of its own.
const SEED_OCR: &str = include_str!("../../examples/seeds/workload-scheduler-ocr.json");

/// Applies a pipeline document under [`APP`] as `id` (or, with `id` empty, as its `name`).
async fn apply_document(
    pipelines: &mut PipelineServiceClient<Channel>,
    id: &str,
    document: &str,
) -> Pipeline {
    pipelines
        .apply_pipeline(ApplyPipelineRequest {
            parent: APP.into(),
            pipeline_id: id.into(),
            source: Some(apply_pipeline_request::Source::SpecDocument(
                document.into(),
            )),
        })
        .await
        .unwrap_or_else(|s| panic!("apply failed: {s:?}"))
        .into_inner()
}

impl Harness {
    async fn apply(&mut self, document: &str) -> Pipeline {
        apply_document(&mut self.pipelines, "", document).await
    }

    /// Applies a document that has no `name` as `id`.
    async fn apply_as(&mut self, id: &str, document: &str) -> Pipeline {
        apply_document(&mut self.pipelines, id, document).await
    }

    async fn submit(
        &mut self,
        pipeline: &str,
        params: &[(&str, &str)],
    ) -> Result<Task, tonic::Status> {
        self.tasks
            .submit_task(SubmitTaskRequest {
                parent: pipeline_name(pipeline),
                params: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..SubmitTaskRequest::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Watches a task to its end; returns the final task and every event seen.
    async fn finish(&mut self, name: &str) -> (Task, Vec<TaskEvent>) {
        let stream = self
            .tasks
            .watch_task(WatchTaskRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        follow_to_end(stream, name).await
    }

    async fn run_to_end(&mut self, pipeline: &str, params: &[(&str, &str)]) -> Task {
        let task = self.submit(pipeline, params).await.unwrap();
        self.finish(&task.name).await.0
    }
}

/// Reads an open watch of `name` until its finished event (within [`WAIT`]); returns the
/// final task and every event seen.
async fn follow_to_end(
    mut stream: tonic::Streaming<TaskEvent>,
    name: &str,
) -> (Task, Vec<TaskEvent>) {
    let mut events = Vec::new();
    let watched = tokio::time::timeout(WAIT, async {
        while let Some(event) = stream.message().await.unwrap() {
            let done = matches!(&event.event, Some(task_event::Event::Finished(_)));
            events.push(event);
            if done {
                return;
            }
        }
        panic!("watch ended without a finished event");
    })
    .await;
    watched.unwrap_or_else(|_| panic!("{name} did not finish within {WAIT:?}"));
    let Some(task_event::Event::Finished(task)) = events.last().and_then(|e| e.event.clone())
    else {
        unreachable!()
    };
    (task, events)
}

fn state(task: &Task) -> TaskState {
    TaskState::try_from(task.state).unwrap()
}

fn field(status: &tonic::Status) -> String {
    pm_proto::status::violated_field(status).unwrap_or_default()
}

fn step(task: &Task, job: usize, step: usize) -> &StepResult {
    &task.result.as_ref().expect("a result").jobs[job].steps[step]
}

/// The sample pipeline: wget fetches the sample image over HTTP, real tesseract reads it,
/// the text is printed; every path is under /mnt/pipe. Then once more as `pm dev --demo`
/// runs it (the same code).
#[tokio::test]
async fn ocr_flow_downloads_recognizes_and_prints() {
    let mut h = start().await;
    let image = h
        .dev
        .sample_image_url
        .clone()
        .expect("the sample is served");
    let submitted = h.submit("ocr", &[("url", &image)]).await.unwrap();
    assert_eq!(state(&submitted), TaskState::Ready);
    assert_eq!(submitted.pipeline_version, 1);
    let (task, events) = h.finish(&submitted.name).await;

    let text = pm_cli::demo::SAMPLE_TEXT;
    assert_eq!(
        pm_cli::demo::recognized(&task),
        Ok(text.to_owned()),
        "{task:#?}"
    );
    assert_eq!(task.attempt, 1);
    let result = task.result.as_ref().unwrap();
    assert_eq!(result.jobs.len(), 2);
    assert_eq!(result.jobs[0].job, "download");
    assert_eq!(step(&task, 0, 0).exit_code, 0);
    assert_eq!(step(&task, 1, 1).stdout.trim(), text);
    // Progress streamed while it ran, not only at the end.
    let streamed: String = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(task_event::Event::Output(o)) => Some(o.data.as_str()),
            _ => None,
        })
        .collect();
    assert!(streamed.contains(text), "{streamed:?}");
    assert!(events.iter().any(|e| matches!(&e.event, Some(task_event::Event::StepStarted(s)) if s.command.starts_with("tesseract /mnt/pipe/image.png"))));

    let (endpoint, anyone) = (h.dev.endpoint(), Default::default());
    let demo = pm_cli::demo::run_sample(&endpoint, &anyone, &image, WAIT);
    let demo = demo.await.unwrap();
    assert_eq!(pm_cli::demo::recognized(&demo), Ok(text.to_owned()));

    let got = h
        .tasks
        .get_task(GetTaskRequest {
            name: task.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, task);
    let listed = h
        .tasks
        .list_tasks(ListTasksRequest {
            parent: pipeline_name("ocr"),
            state: TaskState::Done as i32,
            ..ListTasksRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 2);
    assert_eq!(listed.tasks[1].name, task.name, "newest first");
    h.dev.stop().await;
}

/// LitePipeline's data: a task's JSON `input` is `input.data` to its jobs; the
/// `output.data` they leave is the result's `output`, in GetTask, WatchTask's final event
/// and `pmctl task get`; a bad one ends the task ERROR saying why.
#[tokio::test]
async fn a_task_carries_input_data_in_and_output_data_out() {
    let mut h = start().await;
    h.apply("name: data\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['test -s /mnt/pipe/input.data', 'sed s/pages/words/ input.data > output.data'] }\n")
        .await;
    let input = serde_json::json!({ "pages": [1, 2], "lang": "eng" });
    let submitted = h
        .tasks
        .submit_task(SubmitTaskRequest {
            parent: pipeline_name("data"),
            input: Some(pm_proto::json::from_json(input.clone())),
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pm_proto::json::to_json(submitted.input.as_ref().unwrap()),
        Some(input)
    );
    let (finished, _) = h.finish(&submitted.name).await;
    let expected = serde_json::json!({ "words": [1, 2], "lang": "eng" });
    let output = |task: &Task| {
        let result = task.result.as_ref().unwrap();
        result.output.as_ref().and_then(pm_proto::json::to_json)
    };
    assert_eq!(state(&finished), TaskState::Done, "{finished:#?}");
    assert_eq!(output(&finished), Some(expected.clone()));
    let got = h
        .tasks
        .get_task(GetTaskRequest {
            name: finished.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, finished);
    assert!(got.input.is_some());

    // pmctl: --input in, the output shown by `task get`.
    let endpoint = h.dev.endpoint();
    let shown = tokio::task::spawn_blocking(move || {
        let submitted = pmctl(
            &endpoint,
            &[
                "-o",
                "json",
                "submit",
                "default/demo/data",
                "--input",
                r#"{"pages":"p"}"#,
                "--wait",
            ],
        );
        assert!(submitted.status.success(), "{submitted:?}");
        // The watch's events as JSON documents, the last holding the finished task.
        let documents = serde_json::Deserializer::from_slice(&submitted.stdout).into_iter();
        let documents: Vec<serde_json::Value> = documents.map(Result::unwrap).collect();
        let task = &documents.last().unwrap()["finished"];
        assert_eq!(
            task["result"]["output"],
            serde_json::json!({ "words": "p" })
        );
        let name = task["name"].as_str().unwrap().to_owned();
        pmctl(&endpoint, &["task", "get", &name])
    })
    .await
    .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.contains(r#"output   {"words":"p"}"#), "{shown}");

    h.apply("name: badout\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['echo not json > output.data'] }\n")
        .await;
    let task = h.run_to_end("badout", &[]).await;
    assert_eq!(state(&task), TaskState::Error);
    assert!(
        task.result
            .unwrap()
            .error
            .contains("output.data is not JSON")
    );
    h.dev.stop().await;
}

/// `curl` POSTing `body` as JSON to `url` (plain HTTP/1.1), with `headers`: the HTTP status
/// and the body.
fn curl_json(url: &str, body: &str, headers: &[&str]) -> (u16, String) {
    let mut command = std::process::Command::new("curl");
    command.args([
        "-sS",
        "--max-time",
        "60",
        "-H",
        "Content-Type: application/json",
    ]);
    for header in headers {
        command.args(["-H", header]);
    }
    let out = command
        .args(["-d", body, "-w", "\n%{http_code}", url])
        .output()
        .expect("curl runs (scripts/setup.sh installs it)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned())
}

/// The task calls with curl and JSON at the gateway, and direct runs at an agent: the same
/// validation and errors as gRPC (codes as HTTP statuses), streams as JSON lines.
#[tokio::test]
async fn curl_reaches_task_calls_and_direct_runs_with_json() {
    let h = start().await;
    let base = format!("{}/pm.v1.TaskService", h.dev.endpoint());
    let image = h.dev.sample_image_url.clone().unwrap();
    let ocr = pipeline_name("ocr");
    let (base2, ocr2) = (base.clone(), ocr.clone());
    let calls = tokio::task::spawn_blocking(move || {
        let (base, ocr) = (base2, ocr2);
        let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
        let submit = format!(r#"{{"parent":"{ocr}","params":{{"url":"{image}"}}}}"#);
        let (status, body) = curl_json(&format!("{base}/SubmitTask"), &submit, &[]);
        assert_eq!(status, 200, "{body}");
        let task = json(&body);
        assert_eq!(task["state"], "READY");
        let name = task["name"].as_str().unwrap().to_owned();

        // WatchTask: JSON lines to the finished task.
        let watch = format!(r#"{{"name":"{name}"}}"#);
        let (status, lines) = curl_json(&format!("{base}/WatchTask"), &watch, &[]);
        assert_eq!(status, 200, "{lines}");
        let last = json(lines.lines().last().unwrap());
        assert_eq!(last["finished"]["state"], "DONE", "{lines}");

        let (status, body) = curl_json(&format!("{base}/GetTask"), &watch, &[]);
        assert_eq!((status, json(&body)["state"].as_str()), (200, Some("DONE")));
        let list = format!(r#"{{"parent":"{ocr}","state":"DONE"}}"#);
        let (status, body) = curl_json(&format!("{base}/ListTasks"), &list, &[]);
        assert_eq!(status, 200);
        assert_eq!(json(&body)["tasks"][0]["name"], name.as_str());
        let (status, body) = curl_json(&format!("{base}/CancelTask"), &watch, &[]);
        assert_eq!(
            (status, json(&body)["code"].as_str()),
            (400, Some("failed_precondition"))
        );

        // Refusals: the gRPC code as Connect names it, the field in the message.
        let missing = format!(r#"{{"parent":"{ocr}"}}"#);
        let (status, body) = curl_json(&format!("{base}/SubmitTask"), &missing, &[]);
        let error = json(&body);
        assert_eq!(
            (status, error["code"].as_str()),
            (400, Some("invalid_argument"))
        );
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .starts_with("params.url:"),
            "{body}"
        );
        let (status, body) = curl_json(&format!("{base}/GetTask"), r#"{"name":"x","typo":1}"#, &[]);
        assert_eq!(
            (status, json(&body)["code"].as_str()),
            (400, Some("invalid_argument"))
        );
        let (status, _) = curl_json(
            &format!("{base}/GetTask"),
            &format!(r#"{{"name":"{ocr}/tasks/{:032x}"}}"#, 7),
            &[],
        );
        assert_eq!(status, 404);
    });
    calls.await.unwrap();
    // gRPC on the same port is untouched.
    let mut tasks = h.tasks.clone();
    let listed = tasks
        .list_tasks(ListTasksRequest {
            parent: ocr,
            ..ListTasksRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.into_inner().tasks.len(), 1);
    h.dev.stop().await;

    // RunnerService at an agent (`pm-agent --runner-listen`): the events as JSON lines.
    let runner = RunnerServer::start().await;
    let url = format!("{}/pm.v1.RunnerService/Run", runner.endpoint);
    let ran = tokio::task::spawn_blocking(move || {
        let run = r#"{"specDocument":"stages: [{name: s, jobs: [{name: j, commands: ['echo hi {{who}}', 'cat input.data']}]}]","params":{"who":"you"},"input":{"n":1}}"#;
        let (status, lines) = curl_json(&url, run, &[]);
        assert_eq!(status, 200, "{lines}");
        let events: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let output: String = events
            .iter()
            .filter_map(|e| e["output"]["data"].as_str())
            .collect();
        assert_eq!(output, "hi you\n{\"n\":1}");
        assert_eq!(events.last().unwrap()["finished"]["state"], "DONE");
        let (status, body) = curl_json(&url, r#"{"specDocument":"stages: []"}"#, &[]);
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("spec_document.stages"), "{body}");
    });
    ran.await.unwrap();
    runner.stop().await;
}

/// `examples/seeds/`: one pipeline in each shape of the source documents, applied as
/// written (no `name`, no `params:` where the document has none) and run to DONE.
#[tokio::test]
async fn the_source_documents_shapes_apply_and_run() {
    let mut h = start_with_slots(4).await;
    let image = h.dev.sample_image_url.clone().unwrap();
    let bucket = h.dir.path().join("bucket");
    let bucket = bucket.to_str().unwrap();
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/seeds");
    // (file, the parameters a task gives, what a step must have printed)
    type Run<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let runs: [Run; 4] = [
        (
            "pipeline-manager-task.json",
            &[("image", &image), ("bucket", bucket)],
            "",
        ),
        (
            "workload-scheduler-ocr.json",
            &[("url", &image)],
            pm_cli::demo::SAMPLE_TEXT,
        ),
        ("task-pipeline.yaml", &[], "29"),
        ("task-pipeline.json", &[], "tested"),
    ];
    let mut files: Vec<_> = std::fs::read_dir(&seeds)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".json") || f.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut listed: Vec<_> = runs.iter().map(|r| r.0.to_owned()).collect();
    listed.sort();
    assert_eq!(files, listed, "every fixture is run");
    for (i, (file, params, printed)) in runs.into_iter().enumerate() {
        let document = std::fs::read_to_string(seeds.join(file)).unwrap();
        let id = format!("seed-{i}");
        let applied = h
            .pipelines
            .apply_pipeline(ApplyPipelineRequest {
                parent: APP.into(),
                pipeline_id: id.clone(),
                source: Some(apply_pipeline_request::Source::SpecDocument(document)),
            })
            .await
            .unwrap_or_else(|s| panic!("{file}: {s:?}"))
            .into_inner();
        let declared = &applied.spec.as_ref().unwrap().params;
        for (name, _) in params {
            assert!(
                declared[*name].required,
                "{file}: {name} is implicitly required"
            );
        }
        let task = h.run_to_end(&id, params).await;
        assert_eq!(state(&task), TaskState::Done, "{file}: {task:#?}");
        let outputs: Vec<_> = task
            .result
            .as_ref()
            .unwrap()
            .jobs
            .iter()
            .flat_map(|j| &j.steps)
            .map(|s| s.stdout.trim())
            .collect();
        assert!(
            outputs.contains(&printed),
            "{file}: {printed:?} not in {outputs:?}"
        );
    }
    // pipeline-manager's task recognized both downloads and "uploaded" them to its bucket.
    for copy in ["first.txt", "second.txt"] {
        let text = std::fs::read_to_string(Path::new(bucket).join(copy)).unwrap();
        assert_eq!(text.trim(), pm_cli::demo::SAMPLE_TEXT);
    }
    h.dev.stop().await;
}

/// The source documents' commands name /mnt/pipe: each task sees its own directory there,
/// however many run at once, and nothing of it is left on the host.
#[tokio::test]
async fn concurrent_tasks_each_see_their_own_mnt_pipe() {
    let mut h = start_with_slots(8).await;
    assert!(
        matches!(h.dev.work_mount, pm_agent::WorkMount::Private { .. }),
        "this machine allows a mount namespace (root): {:?}",
        h.dev.work_mount
    );
    h.apply(
        "name: pipe\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['echo {{n}} > /mnt/pipe/mine', 'sleep 0.5', 'cat /mnt/pipe/mine', 'ls -A /mnt/pipe', 'rm -r /mnt/pipe/*'] }\n",
    )
    .await;
    let mut names = Vec::new();
    for n in 0..6 {
        names.push(
            h.submit("pipe", &[("n", &n.to_string())])
                .await
                .unwrap()
                .name,
        );
    }
    for (n, name) in names.iter().enumerate() {
        let (task, _) = h.finish(name).await;
        assert_eq!(state(&task), TaskState::Done, "{task:#?}");
        assert_eq!(step(&task, 0, 2).stdout, format!("{n}\n"), "its own file");
        assert_eq!(step(&task, 0, 3).stdout, "mine\n", "only its own file");
    }
    let host = std::fs::read_dir(pm_agent::work_mount::DEFAULT_AT).unwrap();
    assert!(host.filter_map(Result::ok).all(|e| e.file_name() != "mine"));
    h.dev.stop().await;
}

/// The workload-scheduler document's pipeline, pasted as written: it declares no params, so
/// the `{{url}}` its commands use is a required parameter.
#[tokio::test]
async fn a_seed_pipeline_without_params_requires_what_it_uses() {
    let mut h = start().await;
    let seed = r#"{"pipeline":[{"executor":"wget","commands":["wget -O /mnt/pipe/image.png {{url}}"]},{"executor":"tesseract","commands":["tesseract /mnt/pipe/image.png /mnt/pipe/result","cat /mnt/pipe/result.txt","rm /mnt/pipe/result.txt"]}]}"#;
    let applied = h
        .pipelines
        .apply_pipeline(ApplyPipelineRequest {
            parent: APP.into(),
            pipeline_id: "seed".into(),
            source: Some(apply_pipeline_request::Source::SpecDocument(seed.into())),
        })
        .await
        .unwrap()
        .into_inner();
    let params = &applied.spec.unwrap().params;
    assert!(params["url"].required, "{params:?}");
    let e = h.submit("seed", &[]).await.unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "params.url")
    );
    let task = h
        .submit("seed", &[("url", "http://127.0.0.1:1/x.png")])
        .await;
    let task = task.expect("accepted with its url");
    h.tasks
        .cancel_task(CancelTaskRequest { name: task.name })
        .await
        .map(|_| ())
        .or_else(|e| match e.code() {
            // It may have run (and failed: nothing serves that url) before the cancel.
            Code::FailedPrecondition => Ok(()),
            _ => Err(e),
        })
        .unwrap();
    h.dev.stop().await;
}

/// Output past what one message carries: five steps printing a MiB each end the task DONE in
/// its first attempt, its output cut to the task's budget (it used to be run again every
/// lease, its result never fitting).
#[tokio::test]
async fn an_oversized_result_ends_the_task_in_one_attempt_with_its_output_cut() {
    let mut h = start().await;
    let mib = "head -c 1048576 /dev/zero | tr '\\\\0' x";
    h.apply(&format!(
        "name: loud\nstages:\n  - name: s\n    jobs:\n      - {{ name: j, commands: [\"{mib}\", \"{mib}\", \"{mib}\", \"{mib}\", \"{mib}\"] }}\n"
    ))
    .await;
    let task = h.run_to_end("loud", &[]).await;
    assert_eq!((state(&task), task.attempt), (TaskState::Done, 1));
    let steps = &task.result.as_ref().unwrap().jobs[0].steps;
    let kept: usize = steps.iter().map(|s| s.stdout.len()).sum();
    assert_eq!(kept, pm_agent::runner::TASK_OUTPUT_LIMIT);
    assert!(steps[4].stdout_truncated && !steps[0].stdout_truncated);
    h.dev.stop().await;
}

#[tokio::test]
async fn all_three_document_forms_run() {
    let mut h = start().await;
    let flat = h
        .apply(r#"{"name":"flat","pipeline":[{"executorName":"wget","commands":["echo one > f"]},{"executorName":"tesseract","commands":["cat f","echo two"]}]}"#)
        .await;
    assert_eq!(flat.spec.as_ref().unwrap().stages.len(), 2);
    let task = h.run_to_end("flat", &[]).await;
    assert_eq!(state(&task), TaskState::Done, "{task:#?}");
    assert_eq!(step(&task, 1, 0).stdout, "one\n");

    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/task-pipeline.yaml"),
    )
    .unwrap();
    h.apply(&example).await;
    let task = h.run_to_end("build", &[]).await;
    assert_eq!(state(&task), TaskState::Done, "{task:#?}");
    let result = task.result.unwrap();
    let count = result.jobs.iter().find(|j| j.job == "count").unwrap();
    assert_eq!(count.steps[0].stdout.trim(), "1");
    let lint = result.jobs.iter().find(|j| j.job == "lint").unwrap();
    assert!(!lint.succeeded && lint.allowed_failure);

    // A changed spec is a new version; the same spec again is not.
    let v2 = h
        .apply(r#"{"name":"flat","pipeline":[{"executorName":"x","commands":["true"]}]}"#)
        .await;
    assert_eq!(v2.version, 2);
    let again = h
        .apply(r#"{"name":"flat","pipeline":[{"executorName":"x","commands":["true"]}]}"#)
        .await;
    assert_eq!(again.version, 2);
    // The gateway validates against the new version at once (its cache is dropped on apply).
    let task = h.run_to_end("flat", &[]).await;
    assert_eq!(task.pipeline_version, 2);
    assert_eq!(task.result.unwrap().jobs[0].steps[0].command, "true");
    h.pipelines
        .delete_pipeline(DeletePipelineRequest {
            name: pipeline_name("flat"),
        })
        .await
        .unwrap();
    assert_eq!(
        h.submit("flat", &[]).await.unwrap_err().code(),
        Code::NotFound
    );
    // Made again, it starts over at version 1 with another spec: tasks name their spec by
    // content, so the shard runs the new one, not the old version 1 it still holds.
    let remade = h
        .apply(r#"{"name":"flat","pipeline":[{"executorName":"x","commands":["echo remade"]}]}"#)
        .await;
    assert_eq!(remade.version, 1);
    let task = h.run_to_end("flat", &[]).await;
    assert_eq!(step(&task, 0, 0).stdout, "remade\n", "{task:#?}");
    h.dev.stop().await;
}

/// Concurrent unary submits to one shard share Enqueues at the gateway (coalescing), yet
/// each keeps its own outcome: its own task, the original task for a repeated idempotency
/// key (whether the repeats travel in one Enqueue or in concurrent ones), its own
/// parameters.
#[tokio::test]
async fn concurrent_unary_submits_each_keep_their_own_outcome() {
    let h = start_with_slots(16).await;
    let submits = (0..300).map(|i| {
        let mut tasks = h.tasks.clone();
        async move {
            let key = if i % 3 == 0 {
                format!("key-{}", (i / 3) % 30)
            } else {
                String::new()
            };
            let doc = format!("file:///nonexistent/{i}");
            let request = SubmitTaskRequest {
                parent: pipeline_name("ocr"),
                params: [("url".to_owned(), doc)].into(),
                idempotency_key: key.clone(),
                ..SubmitTaskRequest::default()
            };
            // A repeat of a key whose first submit is still being written is told to retry
            // (ABORTED), as any client is; bounded.
            let mut attempts = 0;
            let task = loop {
                match tasks.submit_task(request.clone()).await {
                    Ok(task) => break task.into_inner(),
                    Err(s) if s.code() == Code::Aborted && attempts < 50 => {
                        attempts += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(s) => panic!("submit {i}: {s:?}"),
                }
            };
            (i, key, task)
        }
    });
    let answers = futures::future::join_all(submits).await;
    let mut by_key: HashMap<String, (usize, String)> = HashMap::new();
    let mut names = std::collections::HashSet::new();
    for (i, key, task) in &answers {
        if key.is_empty() {
            assert!(
                names.insert(task.name.clone()),
                "a task name came back twice"
            );
            assert_eq!(
                task.params["url"],
                format!("file:///nonexistent/{i}"),
                "the task is this submit's own"
            );
        } else {
            // The first submit of a key wins; every repeat gets that task.
            let (first, name) = by_key.entry(key.clone()).or_insert((*i, task.name.clone()));
            assert_eq!(&task.name, name, "submit {i} and {first} share {key}");
        }
    }
    assert_eq!(names.len(), 200);
    assert_eq!(by_key.len(), 30);
    h.dev.stop().await;
}

/// The web console in Debian's headless Chromium (`web/test/browser.mjs`, puppeteer-core):
/// the pipeline list, a task submitted through the form to DONE with its output, a bad
/// parameter's INVALID_ARGUMENT naming the field, the live task list, a running task's live
/// output and its cancel, deep links. Screenshots of a failure go to
/// `target/console-artifacts`.
#[tokio::test]
async fn the_console_works_in_a_real_browser() {
    let mut h = start_with_slots(2).await;
    h.apply("name: greet\nparams:\n  who: { required: true, description: whom to greet }\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['echo hello {{who}}'] }\n").await;
    h.apply("name: slow\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['for i in $(seq 1 120); do echo tick $i; sleep 1; done'] }\n").await;
    let artifacts = h.dir.path().join("console-artifacts");
    browser(&h.dev.endpoint(), &artifacts, &[]).await;
    h.dev.stop().await;

    // With auth on: refused until a token is entered in the page.
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(DevOptions {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        sample: true,
        slots: 0,
        auth: true,
        work_dir_at: None,
        max_watches_per_client: pm_gateway::watch::DEFAULT_MAX_WATCHES_PER_CLIENT,
    })
    .await
    .unwrap();
    let token =
        std::fs::read_to_string(dir.path().join("data").join(pm_cli::dev::ADMIN_TOKEN_FILE))
            .unwrap();
    browser(&dev.endpoint(), &artifacts, &["--token", token.trim()]).await;
    dev.stop().await;
}

/// Runs `web/test/browser.mjs` against `endpoint` (bounded), and fails with its output and
/// the screenshots it left if it fails.
async fn browser(endpoint: &str, artifacts: &Path, args: &[&str]) {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    assert!(
        web.join("node_modules/puppeteer-core").is_dir(),
        "web/node_modules is missing: run ./scripts/setup.sh --test (npm ci in web/)"
    );
    std::fs::create_dir_all(artifacts).unwrap();
    let run = tokio::process::Command::new("node")
        .arg("test/browser.mjs")
        .arg(endpoint)
        .arg(artifacts)
        .args(args)
        .current_dir(&web)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser test ends within 180 s")
        .expect("node runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if !out.status.success() {
        // Kept for a look: the tempdir would take them with it.
        let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-artifacts");
        let _ = std::fs::create_dir_all(&keep);
        for entry in std::fs::read_dir(artifacts).unwrap().flatten() {
            let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
        }
        panic!(
            "the console failed in the browser (screenshots in {}):\n{stdout}\n{stderr}",
            keep.display()
        );
    }
    assert!(stdout.contains("the console passed"), "{stdout}\n{stderr}");
}

/// With no traces exported, a client's W3C trace context still reaches its task and the
/// task's steps (`TRACEPARENT`); an invalid one is ignored, as W3C says, never refused.
#[tokio::test]
async fn a_clients_traceparent_reaches_its_steps_with_traces_off() {
    let mut h = start().await;
    h.apply("name: tp\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['printf %s \"${TRACEPARENT-none}\"'] }\n").await;
    let valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let zero_trace = "00-00000000000000000000000000000000-b7ad6b7169203331-01";
    for (sent, kept) in [(valid, valid), (zero_trace, ""), ("garbage", "")] {
        let mut request = tonic::Request::new(SubmitTaskRequest {
            parent: pipeline_name("tp"),
            ..SubmitTaskRequest::default()
        });
        request
            .metadata_mut()
            .insert("traceparent", sent.parse().unwrap());
        let task = h.tasks.submit_task(request).await.unwrap().into_inner();
        assert_eq!(task.traceparent, kept, "{sent}");
        let (task, _) = h.finish(&task.name).await;
        assert_eq!(
            (state(&task), task.traceparent.as_str()),
            (TaskState::Done, kept)
        );
        let seen = if kept.is_empty() { "none" } else { kept };
        assert_eq!(step(&task, 0, 0).stdout, seen, "{sent}");
    }
    h.dev.stop().await;
}

#[tokio::test]
async fn a_failing_command_ends_in_error_with_its_exit_code_and_stderr() {
    let mut h = start().await;
    h.apply("name: fails\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['echo partial', 'echo boom >&2; exit 3', 'echo never'] }\n").await;
    let task = h.run_to_end("fails", &[]).await;
    assert_eq!(state(&task), TaskState::Error);
    let result = task.result.as_ref().unwrap();
    assert!(!result.succeeded);
    assert_eq!(result.error, "job s/j failed: step 1 exited with code 3");
    let steps = &result.jobs[0].steps;
    assert_eq!(steps.len(), 2, "the command after the failure never ran");
    assert_eq!(
        (steps[1].exit_code, steps[1].stderr.as_str()),
        (3, "boom\n")
    );
    assert_eq!(steps[0].stdout, "partial\n");
    h.dev.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_exact_code_naming_the_field() {
    let mut h = start().await;
    let apply = |source| ApplyPipelineRequest {
        parent: APP.into(),
        pipeline_id: "bad".into(),
        source: Some(source),
    };
    // Empty commands, structured.
    let spec = PipelineSpec {
        stages: vec![Stage {
            name: "s".into(),
            jobs: vec![Job {
                name: "j".into(),
                executor: "host".into(),
                ..Job::default()
            }],
            priority: None,
        }],
        ..PipelineSpec::default()
    };
    let e = h
        .pipelines
        .apply_pipeline(apply(apply_pipeline_request::Source::Spec(spec)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "spec.stages[0].jobs[0].commands")
    );
    // A job naming a stage that does not exist (task-pipeline form).
    let doc = "stages: [a]\njobs:\n  - { name: j, stage: b, commands: [date] }";
    let e = h
        .pipelines
        .apply_pipeline(apply(apply_pipeline_request::Source::SpecDocument(
            doc.into(),
        )))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "spec_document.jobs[0].stage")
    );
    assert!(e.message().contains("\"b\""), "{}", e.message());
    // A stage priority out of range.
    let doc = "stages:\n  - { name: s, priority: 101, jobs: [{ name: j, commands: [date] }] }";
    let e = h
        .pipelines
        .apply_pipeline(apply(apply_pipeline_request::Source::SpecDocument(
            doc.into(),
        )))
        .await
        .unwrap_err();
    assert_eq!(field(&e), "spec_document.stages[0].priority");
    // An application that does not exist.
    let e = h
        .pipelines
        .apply_pipeline(ApplyPipelineRequest {
            parent: "tenants/default/applications/nope".into(),
            ..apply(apply_pipeline_request::Source::SpecDocument(
                "stages: [{name: s, jobs: [{name: j, commands: [x]}]}]".into(),
            ))
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        h.pipelines
            .get_pipeline(GetPipelineRequest {
                name: pipeline_name("bad"),
                version: 0
            })
            .await
            .is_err()
    );

    // Submits.
    let e = h.submit("no-such-pipeline", &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = h
        .submit("ocr", &[("url", "x"), ("bogus", "1")])
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "params.bogus")
    );
    let e = h.submit("ocr", &[]).await.unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "params.url")
    );
    let long = "x".repeat(70 * 1024);
    let e = h.submit("ocr", &[("url", &long)]).await.unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "params.url")
    );
    let e = h
        .tasks
        .submit_task(SubmitTaskRequest {
            parent: pipeline_name("ocr"),
            params: HashMap::from([("url".into(), "x".into())]),
            priority: Some(101),
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "priority")
    );
    let e = h
        .tasks
        .submit_task(SubmitTaskRequest {
            parent: "pipelines/ocr".into(),
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "parent")
    );
    let e = h
        .tasks
        .submit_task(SubmitTaskRequest {
            parent: pipeline_name("ocr"),
            params: HashMap::from([("url".into(), "x".into())]),
            inline: Some(submit_task_request::Inline::InlineSpecDocument(
                r#"{"pipeline":[]}"#.into(),
            )),
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // A request over the 4 MiB limit, sent by a client that allows itself more.
    let mut big = TaskServiceClient::new(pm_proto::client::channel(&h.dev.endpoint()).unwrap())
        .max_encoding_message_size(16 * 1024 * 1024);
    let e = big
        .submit_task(SubmitTaskRequest {
            parent: pipeline_name("ocr"),
            params: HashMap::from([("url".into(), "x".repeat(5 * 1024 * 1024))]),
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // Tasks that do not exist, and a name that is not a task's.
    let e = h
        .tasks
        .get_task(GetTaskRequest {
            name: format!("{}/tasks/nope", pipeline_name("ocr")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = h
        .tasks
        .get_task(GetTaskRequest {
            name: "tasks/1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field(&e).as_str()),
        (Code::InvalidArgument, "name")
    );

    // A batch: each task is acknowledged or refused on its own, and the good one runs.
    let url = h.dev.sample_image_url.clone().unwrap();
    let good = SubmitTaskRequest {
        parent: pipeline_name("ocr"),
        params: HashMap::from([("url".into(), url)]),
        ..SubmitTaskRequest::default()
    };
    let bad = SubmitTaskRequest {
        params: HashMap::new(),
        ..good.clone()
    };
    let results = h
        .tasks
        .submit_tasks(SubmitTasksRequest {
            requests: vec![bad, good],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let Some(submit_task_result::Outcome::Error(refused)) = &results[0].outcome else {
        panic!("{results:?}")
    };
    assert_eq!(
        (refused.code, refused.field.as_str()),
        (Code::InvalidArgument as i32, "params.url")
    );
    let Some(submit_task_result::Outcome::Task(accepted)) = &results[1].outcome else {
        panic!("{results:?}")
    };
    let (task, _) = h.finish(&accepted.name).await;
    assert_eq!(step(&task, 1, 1).stdout.trim(), pm_cli::demo::SAMPLE_TEXT);
    let e = h
        .tasks
        .submit_tasks(SubmitTasksRequest { requests: vec![] })
        .await
        .unwrap_err();
    assert_eq!(field(&e), "requests");
    // A finished task cannot be cancelled.
    let e = h
        .tasks
        .cancel_task(CancelTaskRequest {
            name: task.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    h.dev.stop().await;
}

#[tokio::test]
async fn parameters_never_become_shell_syntax() {
    let mut h = start().await;
    h.apply("name: echo\nparams: { v: { required: true } }\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['printf %s {{v}}', 'printf %s \"$PM_PARAM_V\"'] }\n").await;
    let marker = h.dir.path().join("pwned");
    let m = marker.display().to_string();
    for evil in [
        format!("x; touch {m}"),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!("' ; touch {m}; echo '"),
        format!("\" ; touch {m}; echo \""),
        format!("a\ntouch {m}"),
        format!("&& touch {m}"),
        format!("| touch {m}"),
        format!("{{{{v}}}} $(touch {m})"),
    ] {
        let task = h.run_to_end("echo", &[("v", &evil)]).await;
        assert_eq!(state(&task), TaskState::Done, "{evil:?}: {task:#?}");
        assert_eq!(
            step(&task, 0, 0).stdout,
            evil,
            "substituted as one literal word"
        );
        assert_eq!(
            step(&task, 0, 1).stdout,
            evil,
            "exported as the literal value"
        );
        assert!(!marker.exists(), "{evil:?} ran as shell syntax");
    }
    h.dev.stop().await;
}

#[tokio::test]
async fn inline_tasks_run_the_seed_form_where_allowed_and_cancel_stops_a_run() {
    let mut h = start_with_slots(1).await;
    h.apply("name: open\nallow_inline_tasks: true\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['echo pipeline'] }\n").await;
    let task = h
        .tasks
        .submit_task(SubmitTaskRequest {
            parent: pipeline_name("open"),
            inline: Some(submit_task_request::Inline::InlineSpecDocument(
                r#"{"pipeline":[{"executorName":"wget","commands":["echo inline"]}]}"#.into(),
            )),
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(task.inline);
    let (task, _) = h.finish(&task.name).await;
    assert_eq!(step(&task, 0, 0).stdout, "inline\n");

    // Cancel while running. The agent has one slot, so the next task can only run once the
    // cancelled one's process group is gone: it would otherwise sleep for ten minutes.
    h.apply("name: slow\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['sleep 600'] }\n").await;
    let task = h.submit("slow", &[]).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = h
            .tasks
            .get_task(GetTaskRequest {
                name: task.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if state(&now) == TaskState::InProgress {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never dispatched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled = h
        .tasks
        .cancel_task(CancelTaskRequest {
            name: task.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&cancelled), TaskState::Cancelled);
    let (task, _) = h.finish(&task.name).await;
    assert_eq!(state(&task), TaskState::Cancelled);
    let next = h.run_to_end("open", &[]).await;
    assert_eq!(step(&next, 0, 0).stdout, "pipeline\n");
    h.dev.stop().await;
}

fn pmctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pmctl"))
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn pmctl_applies_submits_waits_and_exits_by_state() {
    let h = start().await;
    let endpoint = h.dev.endpoint();
    let url = format!("url={}", h.dev.sample_image_url.clone().unwrap());
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let out = tokio::task::spawn_blocking(move || {
        let applied = pmctl(
            &endpoint,
            &[
                "pipeline",
                "apply",
                "-f",
                examples.join("seed-flat.json").to_str().unwrap(),
            ],
        );
        assert!(applied.status.success(), "{applied:?}");
        assert!(String::from_utf8_lossy(&applied.stdout).contains("pipelines/flat version 1"));

        let ok = pmctl(
            &endpoint,
            &["submit", "default/demo/ocr", "--param", &url, "--wait"],
        );
        let stdout = String::from_utf8_lossy(&ok.stdout).into_owned();
        assert_eq!(ok.status.code(), Some(0), "{ok:?}");
        assert!(stdout.contains(pm_cli::demo::SAMPLE_TEXT), "{stdout}");
        assert!(stdout.contains(" DONE"), "{stdout}");

        let missing = pmctl(&endpoint, &["submit", "default/demo/ocr", "--wait"]);
        assert_eq!(missing.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&missing.stderr).contains("params.url"),
            "{missing:?}"
        );

        let failed = pmctl(
            &endpoint,
            &[
                "submit",
                "default/demo/ocr",
                "--param",
                "url=http://127.0.0.1:1/nothing.png",
                "--wait",
            ],
        );
        assert_eq!(
            failed.status.code(),
            Some(1),
            "an ERROR task exits non-zero: {failed:?}"
        );
        assert!(String::from_utf8_lossy(&failed.stdout).contains(" ERROR"));

        let json = pmctl(
            &endpoint,
            &["-o", "json", "task", "list", "default/demo/ocr"],
        );
        let listed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(listed["tasks"].as_array().unwrap().len(), 2);
        assert_eq!(listed["tasks"][0]["state"], "ERROR", "newest first");
    })
    .await;
    out.unwrap();
    h.dev.stop().await;
}

#[tokio::test]
async fn grpc_web_and_cors_are_served_on_the_same_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start().await;
    let addr = h.dev.addr;
    let exchange = |request: Vec<u8>| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(&request).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
            .await
            .unwrap()
            .unwrap();
        response
    };
    let preflight = exchange(
        b"OPTIONS /pm.v1.PipelineService/ListPipelines HTTP/1.1\r\nHost: x\r\nOrigin: http://localhost:5173\r\n\
          Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type,x-grpc-web\r\nConnection: close\r\n\r\n"
            .to_vec(),
    )
    .await;
    let text = String::from_utf8_lossy(&preflight).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("access-control-allow-origin: http://localhost:5173"),
        "{text}"
    );

    // ListPipelines { parent: "tenants/default/applications/demo" } as one grpc-web frame.
    let message = prost::Message::encode_to_vec(&ListPipelinesRequest {
        parent: APP.into(),
        ..ListPipelinesRequest::default()
    });
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let mut request = format!(
        "POST /pm.v1.PipelineService/ListPipelines HTTP/1.1\r\nHost: x\r\nOrigin: http://localhost:5173\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let response = exchange(request).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/grpc-web+proto"),
        "{text}"
    );
    assert!(
        text.contains("pipelines/ocr"),
        "the answer carries the sample pipeline: {text}"
    );
    assert!(
        text.contains("grpc-status:0") || text.contains("grpc-status: 0"),
        "{text}"
    );
    h.dev.stop().await;
}

/// A tenant's `quota.max_queued_tasks` counts its unfinished tasks (READY or running): past
/// it a submit is RESOURCE_EXHAUSTED, and a finished task frees its place.
#[tokio::test]
async fn a_tenant_quota_refuses_submits_past_it() {
    let mut h = start().await;
    let channel = pm_proto::client::channel(&h.dev.endpoint()).unwrap();
    pm_proto::client::tenants(channel)
        .create_tenant(CreateTenantRequest {
            tenant_id: "small".into(),
            tenant: Some(Tenant {
                quota: Some(Quota {
                    max_queued_tasks: 1,
                }),
                ..Tenant::default()
            }),
        })
        .await
        .unwrap();
    h.pipelines
        .create_application(CreateApplicationRequest {
            parent: "tenants/small".into(),
            application_id: "a".into(),
            application: None,
        })
        .await
        .unwrap();
    h.pipelines
        .apply_pipeline(ApplyPipelineRequest {
            parent: "tenants/small/applications/a".into(),
            pipeline_id: "slow".into(),
            source: Some(apply_pipeline_request::Source::SpecDocument(
                "stages: [{name: s, jobs: [{name: j, commands: [\"sleep 60\"]}]}]".into(),
            )),
        })
        .await
        .unwrap();
    let submit = || SubmitTaskRequest {
        parent: "tenants/small/applications/a/pipelines/slow".into(),
        ..SubmitTaskRequest::default()
    };
    let first = h.tasks.submit_task(submit()).await.unwrap().into_inner();
    let refused = h.tasks.submit_task(submit()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("small"), "{refused:?}");
    // In a batch, each task on its own: one place, taken.
    let batch = h
        .tasks
        .submit_tasks(SubmitTasksRequest {
            requests: vec![submit(), submit()],
        })
        .await
        .unwrap()
        .into_inner();
    for r in &batch.results {
        let Some(submit_task_result::Outcome::Error(e)) = &r.outcome else {
            panic!("accepted past the quota: {r:?}")
        };
        assert_eq!(Code::from(e.code), Code::ResourceExhausted);
    }
    h.tasks
        .cancel_task(CancelTaskRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap();
    let (cancelled, _) = h.finish(&first.name).await;
    assert_eq!(state(&cancelled), TaskState::Cancelled);
    let second = h.tasks.submit_task(submit()).await.unwrap().into_inner();
    h.tasks
        .cancel_task(CancelTaskRequest { name: second.name })
        .await
        .unwrap();
    h.dev.stop().await;
}

/// What a submit answers (built by the gateway from what it sent and the shard's id and
/// time) is the task the shard holds, but for what running it changes.
#[tokio::test]
async fn a_submit_answers_the_task_the_shard_holds() {
    let mut h = start().await;
    let request = SubmitTaskRequest {
        parent: pipeline_name("ocr"),
        params: [("url".to_owned(), "file:///etc/hostname".to_owned())].into(),
        priority: Some(3),
        idempotency_key: "answer-1".into(),
        timeout_seconds: 30,
        ..SubmitTaskRequest::default()
    };
    let unary = h
        .tasks
        .submit_task(request.clone())
        .await
        .unwrap()
        .into_inner();
    let mut second = request.clone();
    second.idempotency_key = "answer-2".into();
    let batch = h
        .tasks
        .submit_tasks(SubmitTasksRequest {
            requests: vec![second],
        })
        .await
        .unwrap()
        .into_inner();
    let batched = match batch.results[0].outcome.clone() {
        Some(submit_task_result::Outcome::Task(t)) => t,
        other => panic!("refused: {other:?}"),
    };
    // Running changes these; nothing else may differ.
    let settled = |mut t: Task| {
        t.state = 0;
        t.attempt = 0;
        t.update_time_ms = 0;
        t.result = None;
        t
    };
    for answered in [unary, batched] {
        assert_eq!(answered.state, TaskState::Ready as i32);
        let held = h
            .tasks
            .get_task(GetTaskRequest {
                name: answered.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(settled(answered), settled(held));
    }
    h.dev.stop().await;
}
