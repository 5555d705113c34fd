//! Compiles proto/ with protox (pure Rust, no system protoc) and hands the descriptor set to
//! tonic-prost-build. The descriptor set is kept in OUT_DIR for server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "pm/v1/tenant.proto",
    "pm/v1/auth.proto",
    "pm/v1/pipeline.proto",
    "pm/v1/task.proto",
    "pm/v1/agent.proto",
    "pm/v1/runner.proto",
    "pm/internal/v1/shard.proto",
    "pm/internal/v1/metadata.proto",
    "pm/internal/v1/store.proto",
    "pm/internal/v1/exec.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=pm");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["."])?;
    std::fs::write(
        out_dir.join("pm_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    std::fs::create_dir_all(out_dir.join("raw"))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `AgentService.Connect` would clash with the generated `connect` constructor;
        // clients are built from a Channel by `pm_proto::client` instead.
        .build_transport(false)
        // Smaller first buffers than tonic's 8 KiB per call (src/codec.rs).
        .codec_path("crate::codec::PmCodec")
        .compile_fds(fds)?;
    // `pm.v1.AgentService` once more, on raw bytes: the gateway forwards an agent's stream
    // after Hello without decoding and re-encoding it (src/codec.rs `RawCodec`).
    let connect = tonic_build::manual::Method::builder()
        .name("connect")
        .route_name("Connect")
        .input_type("::bytes::Bytes")
        .output_type("::bytes::Bytes")
        .codec_path("crate::codec::RawCodec")
        .client_streaming()
        .server_streaming()
        .build();
    tonic_build::manual::Builder::new()
        .build_transport(false)
        .out_dir(out_dir.join("raw"))
        .compile(&[tonic_build::manual::Service::builder()
            .name("AgentService")
            .package("pm.v1")
            .method(connect)
            .build()]);
    Ok(())
}
