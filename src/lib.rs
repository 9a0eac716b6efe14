//! blockcsi: a CSI v1.12 block-storage driver. See ARCHITECTURE.md for the map of modules.

pub mod authority;
pub mod backend;
pub mod bench;
pub mod config;
pub mod controller;
pub mod csi;
pub mod ctl;
pub mod doctor;
pub mod error;
pub mod faults;
pub mod guard;
pub mod health;
pub mod host;
pub mod http;
pub mod metrics;
pub mod node;
pub mod registration;
pub mod server;
pub mod signature;
pub mod validate;

/// The generated CSI v1 messages and services.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The topology key every node and volume carries; its value is the pool id.
pub const TOPOLOGY_KEY: &str = "topology.blockcsi.dev/pool";
