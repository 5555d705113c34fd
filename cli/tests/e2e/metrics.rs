//! Metrics of a live `pm dev --metrics-listen` (the real binary, as an operator runs it):
//! every component's series on one endpoint, values that follow what the test did, and a
//! scrape that `promtool check metrics` accepts. The same queue through `GetPipelineStats`
//! and `pmctl pipeline stats`.

use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use pm_proto::v1::*;

use super::pm_dev::{PmDev, pm_dev};
use super::{WAIT, pipeline_name, pmctl, state};

/// One plain HTTP/1.1 GET of `url` (`http://host:port/path`): the status line and the body.
async fn get(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("a scrape in time")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The sum of the samples of `name` whose labels include every one of `labels`; `None` if
/// the scrape has no such series.
fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, sample)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, l)) => (n, l),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += sample.parse::<f64>().unwrap();
        }
    }
    found
}

async fn scrape(dev: &PmDev) -> String {
    let (status, body) = get(&format!("{}/metrics", dev.metrics)).await;
    assert!(status.contains("200"), "{status}");
    body
}

async fn wait_for_state(
    tasks: &mut task_service_client::TaskServiceClient<tonic::transport::Channel>,
    name: &str,
    want: TaskState,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let task = tasks
            .get_task(GetTaskRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        if state(&task) == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_live_pm_dev_serves_metrics_and_queue_stats_that_follow_its_tasks() {
    let dev = pm_dev(&[]);
    let channel = pm_proto::client::channel(&dev.endpoint).unwrap();
    let mut tasks = pm_proto::client::tasks(channel.clone());
    let mut pipelines = pm_proto::client::pipelines(channel);
    let ocr = pipeline_name("ocr");
    let submit = |parent: &str, params: &[(&str, &str)]| SubmitTaskRequest {
        parent: parent.to_owned(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..SubmitTaskRequest::default()
    };

    // Three sample tasks to their end, and one refused.
    for _ in 0..3 {
        let task = tasks
            .submit_task(submit(&ocr, &[("url", &dev.image)]))
            .await
            .unwrap()
            .into_inner();
        wait_for_state(&mut tasks, &task.name, TaskState::Done).await;
    }
    let refused = tasks.submit_task(submit(&ocr, &[])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // Two sleepers on one slot: one runs, one waits.
    pipelines
        .apply_pipeline(ApplyPipelineRequest {
            parent: "tenants/default/applications/demo".into(),
            pipeline_id: String::new(),
            source: Some(apply_pipeline_request::Source::SpecDocument(
                "name: slow\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: ['sleep 600'] }\n".into(),
            )),
        })
        .await
        .unwrap();
    let slow = pipeline_name("slow");
    let submitted = std::time::Instant::now();
    let first = tasks
        .submit_task(submit(&slow, &[]))
        .await
        .unwrap()
        .into_inner();
    let second = tasks
        .submit_task(submit(&slow, &[]))
        .await
        .unwrap()
        .into_inner();
    wait_for_state(&mut tasks, &first.name, TaskState::InProgress).await;

    // The same queue through the API: one pipeline, from the shard that owns it.
    let stats = pipelines
        .get_pipeline_stats(GetPipelineStatsRequest {
            name: slow.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.name, slow);
    assert_eq!((stats.ready, stats.in_progress), (1, 1));
    assert_eq!((stats.agents, stats.free_slots), (1, 0));
    assert!(stats.head_wait_ms >= 0 && stats.time_ms > 0, "{stats:?}");
    // The waiting one's age, counted from the second it was submitted in.
    let since = submitted.elapsed().as_millis() as i64;
    assert!(
        (0..=since + 1000).contains(&stats.oldest_ready_age_ms),
        "{stats:?}, submitted {since} ms ago"
    );
    let stats = pipelines
        .get_pipeline_stats(GetPipelineStatsRequest {
            name: ocr.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            stats.ready,
            stats.in_progress,
            stats.head_wait_ms,
            stats.oldest_ready_age_ms
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(
        (
            stats.done_last_minute,
            stats.error_last_minute,
            stats.cancelled_last_minute
        ),
        (3, 0, 0)
    );
    // And through pmctl, as JSON and as a table.
    let endpoint = dev.endpoint.clone();
    let (json, table) = tokio::task::spawn_blocking(move || {
        let json = pmctl(
            &endpoint,
            &["-o", "json", "pipeline", "stats", "default/demo/slow"],
        );
        let table = pmctl(&endpoint, &["pipeline", "stats", "default/demo/ocr"]);
        (json, table)
    })
    .await
    .unwrap();
    assert!(json.status.success(), "{json:?}");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["ready"], "1", "{json}");
    assert_eq!(json["inProgress"], "1", "{json}");
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("DONE/MIN") && table.contains("HEAD_WAIT"),
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["0", "0", "3"], "{table}");

    let s = scrape(&dev).await;
    let ocr_labels = [
        ("tenant", "default"),
        ("application", "demo"),
        ("pipeline", "ocr"),
    ];
    let slow_labels = [
        ("tenant", "default"),
        ("application", "demo"),
        ("pipeline", "slow"),
    ];
    let with = |base: &[(&'static str, &'static str)], more: (&'static str, &'static str)| {
        let mut l = base.to_vec();
        l.push(more);
        l
    };
    // The shard's queue and counters, per pipeline.
    assert_eq!(
        value(&s, "pm_tasks_submitted_total", &ocr_labels),
        Some(3.0),
        "{s}"
    );
    assert_eq!(
        value(
            &s,
            "pm_tasks_finished_total",
            &with(&ocr_labels, ("state", "done"))
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "pm_tasks_finished_total",
            &with(&ocr_labels, ("state", "error"))
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "pm_queue_tasks", &with(&ocr_labels, ("state", "ready"))),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "pm_queue_tasks",
            &with(&slow_labels, ("state", "in_progress"))
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "pm_queue_tasks",
            &with(&slow_labels, ("state", "ready"))
        ),
        Some(1.0)
    );
    assert_eq!(value(&s, "pm_agent_sessions", &[]), Some(1.0));
    assert_eq!(
        value(&s, "pm_agent_slots_free", &[]),
        Some(0.0),
        "the one slot is busy"
    );
    assert_eq!(value(&s, "pm_ring_shards", &[]), Some(1.0));
    assert_eq!(value(&s, "pm_ring_owned_keys", &[]), Some(2.0));
    // Histograms that moved: 4 dispatches, 3 results; every submit was a group commit.
    assert_eq!(
        value(&s, "pm_dispatch_latency_seconds_count", &[]),
        Some(4.0)
    );
    assert_eq!(value(&s, "pm_task_duration_seconds_count", &[]), Some(3.0));
    assert!(value(&s, "pm_journal_sync_seconds_count", &[]).unwrap() >= 5.0);
    assert!(value(&s, "pm_journal_fsync_seconds_count", &[]).unwrap() >= 5.0);
    assert!(value(&s, "pm_journal_batch_writes_sum", &[]).unwrap() >= 5.0);
    assert!(value(&s, "pm_journal_sync_seconds_bucket", &[("le", "+Inf")]).unwrap() >= 5.0);
    for zero in [
        "pm_store_errors_total",
        "pm_leases_expired_total",
        "pm_results_duplicate_total",
        "pm_handoff_tasks_total",
        "pm_gateway_routing_retries_total",
    ] {
        assert_eq!(value(&s, zero, &[]), Some(0.0), "{zero}");
    }
    // The embedded agent: three ran, one runs.
    let agent = |outcome| {
        value(
            &s,
            "pm_agent_tasks_total",
            &[("component", "agent"), ("outcome", outcome)],
        )
    };
    assert_eq!(agent("succeeded"), Some(3.0));
    assert_eq!(agent("failed"), Some(0.0));
    assert_eq!(value(&s, "pm_agent_tasks_running", &[]), Some(1.0));
    assert_eq!(value(&s, "pm_agent_connected", &[]), Some(1.0));
    // The gateway's cache: the first submit of each pipeline fetched it.
    assert!(value(&s, "pm_gateway_pipeline_cache_total", &[("result", "miss")]).unwrap() >= 2.0);
    assert!(value(&s, "pm_gateway_pipeline_cache_total", &[("result", "hit")]).unwrap() >= 3.0);
    // gRPC server metrics of each component, with the code of each call.
    let submits = [
        ("component", "gateway"),
        ("grpc_service", "pm.v1.TaskService"),
        ("grpc_method", "SubmitTask"),
        ("grpc_type", "unary"),
    ];
    assert_eq!(value(&s, "grpc_server_started_total", &submits), Some(6.0));
    assert_eq!(
        value(
            &s,
            "grpc_server_handled_total",
            &with(&submits, ("grpc_code", "OK"))
        ),
        Some(5.0)
    );
    assert_eq!(
        value(
            &s,
            "grpc_server_handled_total",
            &with(&submits, ("grpc_code", "InvalidArgument"))
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "grpc_server_handling_seconds_count", &submits),
        Some(6.0)
    );
    let enqueues = [("component", "shard"), ("grpc_method", "Enqueue")];
    assert!(
        value(
            &s,
            "grpc_server_handled_total",
            &with(&enqueues, ("grpc_code", "OK"))
        )
        .unwrap()
            >= 5.0
    );
    let applies = [
        ("component", "tenant-service"),
        ("grpc_method", "ApplyPipeline"),
    ];
    assert_eq!(
        value(
            &s,
            "grpc_server_handled_total",
            &with(&applies, ("grpc_code", "OK"))
        ),
        Some(1.0)
    );
    let connects = [
        ("component", "shard"),
        ("grpc_method", "Connect"),
        ("grpc_type", "bidi_stream"),
    ];
    assert_eq!(value(&s, "grpc_server_started_total", &connects), Some(1.0));

    // Cancelling the runner lets the waiting one in: the gauges follow.
    tasks
        .cancel_task(CancelTaskRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap();
    wait_for_state(&mut tasks, &second.name, TaskState::InProgress).await;
    let s = scrape(&dev).await;
    assert_eq!(
        value(
            &s,
            "pm_queue_tasks",
            &with(&slow_labels, ("state", "ready"))
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "pm_queue_tasks",
            &with(&slow_labels, ("state", "in_progress"))
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "pm_tasks_finished_total",
            &with(&slow_labels, ("state", "cancelled"))
        ),
        Some(1.0)
    );
    assert_eq!(value(&s, "pm_agent_tasks_running", &[]), Some(1.0));

    // The format, as Prometheus's own linter reads it.
    let path = dev.dir.path().join("scrape.txt");
    std::fs::write(&path, &s).unwrap();
    let promtool = std::env::var_os("PM_PROMTOOL_BIN").unwrap_or_else(|| "promtool".into());
    let checked = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .unwrap_or_else(|e| {
            panic!("no promtool ({e}): run ./scripts/setup.sh --test or set PM_PROMTOOL_BIN")
        });
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // Every metric the shipped alert rules and dashboard read is one pm dev serves (but the
    // cluster-only ones).
    let monitoring = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/monitoring");
    const CLUSTER_ONLY: &[&str] = &["pm_etcd_connected"];
    for file in ["rules.yaml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(monitoring.join(file)).unwrap();
        let names = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("pm_") || w.starts_with("grpc_server_"));
        for name in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                CLUSTER_ONLY.contains(&base) || s.contains(&format!("# TYPE {base} ")),
                "{file} reads {name}, which pm dev does not serve"
            );
        }
    }

    // Anything but /metrics is a 404.
    let (status, _) = get(&format!("{}/other", dev.metrics)).await;
    assert!(status.contains("404"), "{status}");
}
