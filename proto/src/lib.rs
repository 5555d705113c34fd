//! The wire of pipeline-manager, generated at build time from `proto/` (the one source of
//! truth): [`v1`] is the public API, [`internal::v1`] the gateway <-> shard protocol. Hand-written
//! helpers for resource names sit in [`names`].

pub mod agent;
pub mod client;
pub mod codec;
pub mod connections;
pub mod in_flight;
pub mod json;
pub mod json_http;
pub mod metrics;
pub mod names;
pub mod plain_http;
pub mod server;
pub mod status;
pub mod tls;
pub mod trace;

/// The public API, `pm.v1`.
#[allow(clippy::large_enum_variant)] // generated oneofs; boxing would change the API
pub mod v1 {
    tonic::include_proto!("pm.v1");
}

/// Internal protocols.
pub mod internal {
    /// `pm.internal.v1`: gateway -> shard.
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("pm.internal.v1");
    }
}

/// `pm.v1.AgentService` with every message as its encoded bytes ([`codec::RawCodec`]), client
/// and server: the same calls on the wire as [`v1`]'s, for a hop that forwards what it does
/// not change (the gateway, after an agent's Hello).
#[allow(clippy::default_constructed_unit_structs)] // generated: every codec by `default()`
pub mod raw {
    include!(concat!(env!("OUT_DIR"), "/raw/pm.v1.AgentService.rs"));
}

/// The encoded descriptor set of every proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pm_descriptor.bin"));

/// Every method of our protos and of the standard health service, by its path
/// (`/pkg.Service/Method`): what the metrics layer labels and the JSON layer transcodes.
pub fn methods() -> &'static std::collections::HashMap<String, prost_reflect::MethodDescriptor> {
    static METHODS: std::sync::OnceLock<
        std::collections::HashMap<String, prost_reflect::MethodDescriptor>,
    > = std::sync::OnceLock::new();
    METHODS.get_or_init(|| {
        let mut pool = prost_reflect::DescriptorPool::new();
        for set in [FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
            if let Err(e) = pool.decode_file_descriptor_set(set) {
                tracing::error!(error = %e, "a descriptor set does not decode");
            }
        }
        pool.services()
            .flat_map(|s| s.methods().collect::<Vec<_>>())
            .map(|m| {
                (
                    format!("/{}/{}", m.parent_service().full_name(), m.name()),
                    m,
                )
            })
            .collect()
    })
}

/// Largest message a server or client of ours accepts, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The newest agent protocol version this build speaks. 2 added `ResultPart`.
pub const AGENT_PROTOCOL_VERSION: u32 = 2;

/// The oldest agent protocol version this build speaks.
pub const AGENT_PROTOCOL_MIN: u32 = 1;

/// The most bytes of a result one `ResultPart` carries; a larger result goes in parts.
pub const RESULT_PART_BYTES: usize = 64 * 1024;

/// Milliseconds since the Unix epoch, the unit of every `*_ms` time field.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
