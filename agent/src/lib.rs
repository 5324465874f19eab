//! The Baton device agent as a library: `baton-agent` is a thin `main` over it,
//! and end-to-end tests drive the same code.

pub mod assemble;
pub mod backoff;
pub mod clock;
pub mod commands;
pub mod config;
pub mod engine;
pub mod gate;
pub mod image;
pub mod instance;
pub mod join;
pub mod link;
pub mod load;
pub mod lograte;
pub mod net;
pub mod node;
pub mod probe;
pub mod reconcile;
pub mod restart;
pub mod rollback;
pub mod runtime;
pub mod session;
pub mod simulate;
pub mod step;
pub mod supervisor;
pub mod tls;
pub mod trust;
pub mod upgrade;
pub mod version;
