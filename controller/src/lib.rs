//! The Baton controller as a library: the `baton` binary (server and CLI) is a
//! thin `main` over it, and end-to-end tests drive the same code.

pub mod api;
pub mod autoscale;
pub mod broker;
pub mod cli;
pub mod commands;
pub mod controller;
pub mod dashboard;
pub mod datadir;
pub mod desired;
pub mod dynsec;
pub mod fleet;
pub mod ingest;
pub mod keys;
pub mod metrics;
pub mod pinning;
pub mod rollout;
pub mod schedule;
pub mod server;
pub mod sessions;
pub mod store;
pub mod tenant;
pub mod tls;
pub mod upgrade;
pub mod view;
pub mod webhook;
pub mod windows;
pub mod workload;
