//! What every server of ours mounts besides its own services: reflection over our descriptor
//! set and `grpc.health.v1`, plus the one place SIGTERM/SIGINT are turned into a shutdown,
//! and the servers' runtime ([`block_on_without_lifo`]).

use std::time::Duration;

use tonic_health::server::HealthReporter;

/// Makes every file and directory this process creates from now on its user's only (umask
/// 077: files 0600, directories 0700): tasks, metadata and credentials live in them. The
/// shard, tenant-service and `pm dev` call it first thing; the agent does not, since its
/// work directories are shared with executor containers.
pub fn private_files() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Runs a server's `main` on tokio's multi-threaded runtime without its LIFO slot, where the
/// build allows it (`--cfg tokio_unstable`, which `.cargo/config.toml` sets; without it,
/// tokio's default). The gateway, the shard and `pm dev` (both in one process) run on it.
///
/// Why: with the LIFO slot, a task that a running task wakes runs next. When one coalesced
/// Enqueue answers many submits of one HTTP/2 connection, each answered call wakes the
/// connection's task, which then runs at once and writes that one answer: a `writev` per
/// answer. Without the slot, the woken calls run first, in order, and the connection writes
/// their answers together. Measured (perf/RESULTS.md, "One write for many answers"): 39-67%
/// fewer `writev` in the gateway and 3-21% less gateway CPU per unary submit, in every pair.
/// In the shard ("The shard without the LIFO slot"): cycles straight to it faster, at less
/// shard CPU per task, in all eight pairs of one session; through the gateway they moved both
/// ways. Why the shard gains was not profiled (its `writev` count, taken in another scenario,
/// did not move one way). tenant-service (off the hot path, not measured alone) and
/// `pm-null` (the floors) keep tokio's default.
///
/// Panics if the runtime cannot be built, as `#[tokio::main]` does.
pub fn block_on_without_lifo<F: std::future::Future>(main: F) -> F::Output {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    runtime
        .build()
        .expect("building the tokio runtime")
        .block_on(main)
}

/// The server builder every pm server starts from: HTTP/2 keepalive, so dead peers of
/// long-lived streams are noticed.
pub fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// Connections accepted on a bound listener, with TCP_NODELAY: without it the trailers of a
/// unary answer (a separate small write) wait for the client's delayed ACK, ~40 ms a call.
/// With TLS on ([`crate::tls::init`]), through mTLS: the peer must present a certificate of
/// the CA (internal services).
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<crate::tls::ServerIo>> + Send + 'static {
    crate::tls::accept(listener, crate::tls::get().and_then(|t| t.mutual.clone()))
}

/// The same for a public port (the gateway's): with TLS on, clients need no certificate.
pub fn incoming_public(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<crate::tls::ServerIo>> + Send + 'static {
    crate::tls::accept(listener, crate::tls::get().and_then(|t| t.public.clone()))
}

/// Server reflection (v1) over every pm proto.
pub fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("our own descriptor set is valid")
}

/// A health service and its reporter; the overall status ("") starts SERVING.
pub fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// The flags every server binary (gateway, tenant-service, shard) takes besides its own.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Also serve `grpc.health.v1` alone, in plaintext, on this address: for probes that
    /// cannot speak TLS (kubelet's gRPC probes).
    #[arg(long, env = "PM_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    /// Connections the server holds at once; past it a new one is closed at once. Kept
    /// below the file-descriptor limit, which the server raises to its hard limit.
    #[arg(long, env = "PM_MAX_CONNECTIONS", default_value_t = crate::connections::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Calls the server handles at once over all its connections; past it a call is
    /// answered RESOURCE_EXHAUSTED at once (load shedding).
    #[arg(long, env = "PM_MAX_IN_FLIGHT", default_value_t = crate::in_flight::DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// How log lines are written to stderr.
    #[arg(long, env = "PM_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (plaintext HTTP/1.1). Without it
    /// nothing is recorded.
    #[arg(long, env = "PM_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

impl ServerArgs {
    /// Turns TLS on and binds the health-only port, as the flags say; call at start.
    pub fn init(&self) -> Result<(), String> {
        self.tls.init(true).map_err(|e| e.to_string())?;
        crate::connections::set_max_connections(self.max_connections);
        crate::in_flight::set_max_in_flight(self.max_in_flight);
        if let Some(addr) = &self.health_listen {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            // The bound address: with port 0 the kernel picks it, and this line says which.
            tracing::info!(addr = ?listener.local_addr().ok(), "health port listening");
            set_health_listener(listener);
        }
        if let Some(addr) = &self.metrics_listen {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            tracing::info!(addr = ?listener.local_addr().ok(), "metrics listening");
            crate::metrics::set_listener(listener);
        }
        Ok(())
    }
}

static HEALTH_LISTENER: std::sync::Mutex<Option<std::net::TcpListener>> =
    std::sync::Mutex::new(None);

/// Gives this process a health-only port: plaintext, serving `grpc.health.v1` and nothing
/// else, for probes that cannot speak TLS (kubelet's). Call at start, before the server runs.
pub fn set_health_listener(listener: std::net::TcpListener) {
    *HEALTH_LISTENER.lock().expect("health listener lock") = Some(listener);
}

/// Serves `service` on the health-only port, if this process has one, until `shutdown`; the
/// first server of the process to call it takes the port.
pub async fn serve_health_port<S>(
    service: tonic_health::pb::health_server::HealthServer<S>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) where
    S: tonic_health::pb::health_server::Health,
{
    let Some(listener) = HEALTH_LISTENER.lock().expect("health listener lock").take() else {
        return;
    };
    let served = async {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                shutdown,
            )
            .await
            .map_err(std::io::Error::other)
    };
    if let Err(e) = served.await {
        tracing::error!(error = %e, "the health port stopped");
    }
}

/// How long open streams (agent streams, watches) may delay a server's exit once it has
/// stopped accepting: a graceful stop waits for every connection, and an agent's never ends
/// by itself.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs `served`, a server that stops gracefully once `stopping` is cancelled; whatever is
/// still open [`STOP_GRACE`] after that is cut.
pub async fn with_stop_grace<E>(
    served: impl std::future::Future<Output = Result<(), E>>,
    stopping: &tokio_util::sync::CancellationToken,
) -> Result<(), E> {
    tokio::select! {
        served = served => served,
        _ = async {
            stopping.cancelled().await;
            tokio::time::sleep(STOP_GRACE).await;
        } => {
            tracing::info!("streams still open after {STOP_GRACE:?}; stopping anyway");
            Ok(())
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT. A second signal exits the process at once, so a
/// stuck drain can always be cut short.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object a line (`timestamp`, `level`, `fields`, `target`, `span`, `spans`),
    /// for log collectors.
    Json,
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`), and exports spans
/// over OTLP when the environment asks for it ([`crate::trace`]; `service` names this
/// process there). Call once, first, inside the runtime; keep what it returns and call its
/// `shutdown` before exiting.
pub fn init_tracing(format: LogFormat, service: &'static str) -> crate::trace::Tracing {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt);
    match crate::trace::init(service) {
        Ok((otel, tracing)) => {
            let _ = registry.with(otel).try_init();
            tracing
        }
        Err(e) => {
            let _ = registry.try_init();
            tracing::error!(error = %e, "traces are off");
            crate::trace::Tracing::off()
        }
    }
}

/// The servers' allocator, declared in each server binary (`pm-gateway`, `pm-tenant-service`,
/// `pm-shard`, `pm`) with `pm_proto::server_allocator!();`. On x86_64 it is jemalloc: less
/// CPU per request than glibc's malloc, without mimalloc's latency spikes (perf/RESULTS.md,
/// "The allocator"). Its background purging thread is off: it returns ~45 MiB of an idle
/// shard that held a million tasks, but cost ~9% more CPU per task in 1-slot cycles
/// ("jemalloc's background thread"); `_RJEM_MALLOC_CONF=background_thread:true` turns it on.
/// A quiet shard purges once instead ([`release_free_memory`]).
/// Elsewhere glibc's: jemalloc fixes its page size when it is built, and Raspberry Pi 5
/// kernels use 16 KiB pages. The binary needs `tikv-jemallocator` on x86_64.
#[macro_export]
macro_rules! server_allocator {
    () => {
        #[cfg(target_arch = "x86_64")]
        #[global_allocator]
        static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
    };
}

/// Hands the pages the allocator holds free back to the OS, and returns the resident memory
/// (MiB) before and after. jemalloc purges freed pages only as it is called (its background
/// thread is off, see [`server_allocator!`]), so a server that freed much and then went quiet
/// keeps them resident until its next burst: a shard that has just filled with a million
/// tasks held ~50 MiB of flushed memtables that way (perf/RESULTS.md, "A quiet shard gives
/// memory back"). Takes milliseconds: call it off the async workers, and
/// only when idle (`pm_scheduler_shard::memory`). In a binary with another global allocator
/// (the tests') it purges jemalloc's own empty arenas, which changes nothing.
pub fn release_free_memory() -> (Option<f64>, Option<f64>) {
    let before = resident_mib();
    #[cfg(target_arch = "x86_64")]
    {
        // MALLCTL_ARENAS_ALL: every arena.
        const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";
        // SAFETY: `arena.<i>.purge` reads and writes nothing: every pointer is null and the
        // length 0, as jemalloc's manual gives it; the name is a NUL-terminated C string.
        #[allow(unsafe_code)]
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                PURGE_ALL.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            tracing::warn!(errno = rc, "jemalloc refused to purge its arenas");
        }
    }
    #[cfg(all(not(target_arch = "x86_64"), target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks glibc's own arenas; 0 keeps no padding.
        #[allow(unsafe_code)]
        unsafe {
            nix::libc::malloc_trim(0);
        }
    }
    (before, resident_mib())
}

/// This process's resident memory in MiB, from `/proc/self/status` (`None` where there is none).
pub fn resident_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    // The servers' allocator, so that the test below frees what a server would.
    crate::server_allocator!();

    #[test]
    fn releasing_hands_freed_pages_back() {
        // 64 MiB in 1 MiB pieces, every page touched, then freed: jemalloc keeps them
        // resident (dirty) until it decays them, which takes seconds and calls.
        let pieces: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8 | 1; 1 << 20]).collect();
        assert!(pieces.iter().all(|p| p[4096] != 0));
        drop(pieces);
        let (before, after) = super::release_free_memory();
        let (before, after) = (before.expect("VmRSS"), after.expect("VmRSS"));
        #[cfg(target_arch = "x86_64")]
        assert!(
            before - after >= 32.0,
            "resident {before:.1} MiB before the release, {after:.1} after"
        );
        #[cfg(not(target_arch = "x86_64"))]
        assert!(after > 0.0);
    }
}
