//! The daemon's plumbing around the CSI services: start-up and shutdown (`server`), settings
//! (`config`), the HTTP listener for health and metrics, and kubelet plugin registration.

pub mod authority;
pub mod config;
pub mod health;
pub mod http;
pub mod metrics;
pub mod registration;
pub mod server;
