//! blockcsi: a CSI v1.12 block-storage driver. See ARCHITECTURE.md for the map of modules.
//!
//! Layers, data flowing one way: `daemon` (process plumbing) -> `csi` (gRPC adapters) ->
//! `controller` / `node` (the logic) -> `storage` (backends) and `host` (the kernel).
//! `tools` (ctl, doctor, bench) sit beside the driver and use it; nothing in it uses them.

pub mod client;
pub mod controller;
pub mod csi;
pub mod daemon;
pub mod error;
pub mod host;
pub mod node;
pub mod storage;
pub mod support;
pub mod tools;

/// The generated CSI v1 messages and services.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The topology key every node and volume carries; its value is the pool id.
pub const TOPOLOGY_KEY: &str = "topology.blockcsi.dev/pool";
