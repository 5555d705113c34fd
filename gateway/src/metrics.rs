//! The gateway's own metrics (besides the gRPC server metrics every server has): its pipeline
//! cache and its routing retries. Every series carries `component="gateway"`. The handles are
//! made on first use, after `--metrics-listen` installed the recorder at start.

use std::sync::LazyLock;

use ::metrics::{Counter, counter, describe_counter};

pub const COMPONENT: &str = "gateway";

pub struct GatewayMetrics {
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub routing_retries: Counter,
}

pub static METRICS: LazyLock<GatewayMetrics> = LazyLock::new(|| {
    describe_counter!(
        "pm_gateway_pipeline_cache_total",
        "Pipeline lookups of submits, by result: hit (served from the cache) or miss (fetched from tenant-service)."
    );
    describe_counter!(
        "pm_gateway_routing_retries_total",
        "Calls sent again because the shard asked was not the pipeline's owner (a ring change)."
    );
    GatewayMetrics {
        cache_hits: counter!("pm_gateway_pipeline_cache_total", "component" => COMPONENT, "result" => "hit"),
        cache_misses: counter!("pm_gateway_pipeline_cache_total", "component" => COMPONENT, "result" => "miss"),
        routing_retries: counter!("pm_gateway_routing_retries_total", "component" => COMPONENT),
    }
});
