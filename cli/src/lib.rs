//! The command line: [`dev`] is the all-in-one `pm dev` (gateway, tenant-service, one shard
//! and an agent in one process, each on its own loopback port and talking gRPC exactly as in
//! a cluster); [`ctl`] is `pmctl`, the command line over the public API; [`demo`] is the
//! sample OCR run.

pub mod ctl;
pub mod demo;
pub mod deploy;
pub mod dev;
