//! A live `pm dev` process, as an operator runs it: the real binary on free loopback ports,
//! JSON logs read as they come.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use super::WAIT;

/// A `pm dev` process, killed when dropped.
pub struct PmDev {
    child: Child,
    pub endpoint: String,
    pub metrics: String,
    /// The sample image pm dev serves.
    pub image: String,
    /// Its log lines after the addresses, as they come (JSON objects).
    pub logs: std::sync::mpsc::Receiver<String>,
    /// Its data directory and scratch space, removed when dropped.
    pub dir: tempfile::TempDir,
}

impl Drop for PmDev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `pm dev` on free ports with one agent slot and JSON logs, with `env` added to its
/// environment; returns once it logged both addresses (every line up to them must be a JSON
/// object).
pub fn pm_dev(env: &[(&str, &str)]) -> PmDev {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pm"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--slots", "1", "--log-format", "json", "--data-dir"])
        .arg(dir.path().join("data"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Read on a thread: the lines come when pm dev is up; the test bounds the wait. The
    // thread reads to the end, so pm dev never writes into a closed pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + WAIT;
    let (mut endpoint, mut metrics, mut image) = (None, None, None);
    while endpoint.is_none() || metrics.is_none() || image.is_none() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("pm dev printed its addresses in time");
        // --log-format json: every line is one JSON object, its text in fields.message.
        let log: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(
            log["timestamp"].is_string() && log["level"].is_string(),
            "{line}"
        );
        let line = log["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let word_after = |marker: &str| {
            let rest = &line[line.find(marker)? + marker.len()..];
            Some(rest.split_whitespace().next()?.to_owned())
        };
        if line.contains("serving gRPC") {
            endpoint = word_after(" on ");
        }
        if line.contains(" try ") {
            image = word_after("--param url=");
        }
        if line.contains("metrics of every component") {
            metrics = word_after(" at ").map(|url| url.trim_end_matches("/metrics").to_owned());
        }
    }
    PmDev {
        child,
        endpoint: endpoint.unwrap(),
        metrics: metrics.unwrap(),
        image: image.unwrap(),
        logs: rx,
        dir,
    }
}

/// `--no-agent` is `--slots 0` by name; asking for both, or for the demo (which needs the
/// embedded agent), is refused before anything starts.
#[test]
fn no_agent_is_refused_with_slots_or_the_demo() {
    for extra in [&["--slots", "2"][..], &["--demo"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_pm"))
            .args(["dev", "--no-agent"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("'--no-agent' cannot be used with"),
            "{stderr}"
        );
    }
}
