//! The processes under test: the real release binaries, started in a temp dir on free
//! loopback ports, measured through /proc (CPU seconds, RSS), stopped with real signals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub struct Proc {
    pub name: String,
    pub endpoint: String,
    child: Child,
    log: PathBuf,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Proc {
    /// Starts `bin` from `bin_dir` listening on a free port; waits until it serves health.
    pub async fn start(
        bin_dir: &Path,
        bin: &str,
        args: &[String],
        dir: &Path,
    ) -> anyhow::Result<Proc> {
        Self::start_on(bin_dir, bin, args, dir, free_port()).await
    }

    pub async fn start_on(
        bin_dir: &Path,
        bin: &str,
        args: &[String],
        dir: &Path,
        port: u16,
    ) -> anyhow::Result<Proc> {
        let path = bin_dir.join(bin);
        let log = dir.join(format!("{bin}-{port}.log"));
        let child = Command::new(&path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build with --release first)",
                    path.display()
                )
            })?;
        let proc = Proc {
            name: bin.to_owned(),
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
            log,
        };
        proc.wait_serving(Duration::from_secs(120)).await?;
        Ok(proc)
    }

    pub async fn wait_serving(&self, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let channel = pm_proto::client::channel(&self.endpoint)?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        loop {
            let probe = health.check(tonic_health::pb::HealthCheckRequest::default());
            let last = match tokio::time::timeout(Duration::from_millis(500), probe).await {
                Ok(Ok(_)) => return Ok(started.elapsed()),
                Ok(Err(status)) => format!("{status:?}"),
                Err(_) => "no answer within 500 ms".to_owned(),
            };
            if started.elapsed() > limit {
                // The log goes with the bench dir: its end is in the error.
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!(
                    "{} not serving after {limit:?} (last probe: {last}); the end of its log:\n{}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(&format!("/proc/{}/stat", self.pid()))
    }

    /// Resident set size in MiB.
    pub fn rss_mib(&self) -> f64 {
        rss_mib_of(&format!("/proc/{}/status", self.pid()))
    }

    /// The process's log so far.
    pub fn log_so_far(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, wait; returns the process's log.
    pub fn stop(mut self) -> String {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, wait.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cpu_seconds_of(stat: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let Some((_, rest)) = text.rsplit_once(") ") else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0
}

fn rss_mib_of(status: &str) -> f64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// This process's own CPU seconds (the load generator).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds_of("/proc/self/stat")
}
