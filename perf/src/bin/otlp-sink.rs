//! `otlp-sink`: an OTLP/gRPC trace receiver that only counts what it gets, so the cost of
//! traces can be measured with a real exporter on the other end and nothing else working.
//! Prints the spans and export calls received when stopped (SIGINT or SIGTERM).

use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Parser)]
#[command(about = "an OTLP/gRPC trace sink that counts spans, for pm-perf runs with traces on")]
struct Args {
    #[arg(long)]
    listen: std::net::SocketAddr,
}

static SPANS: AtomicU64 = AtomicU64::new(0);
static EXPORTS: AtomicU64 = AtomicU64::new(0);

struct Sink;

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        SPANS.fetch_add(spans as u64, Ordering::Relaxed);
        EXPORTS.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink).max_decoding_message_size(64 << 20))
        .serve_with_shutdown(args.listen, pm_proto::server::shutdown_signal())
        .await?;
    println!(
        "otlp-sink: {} spans in {} exports",
        SPANS.load(Ordering::Relaxed),
        EXPORTS.load(Ordering::Relaxed)
    );
    Ok(())
}
