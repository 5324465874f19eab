//! Baton's MQTT contract: topic names, message types and the postcard codec.
//!
//! This crate is the only code the agent and the controller share. It does no
//! I/O and knows nothing of tokio or MQTT client libraries: it turns typed
//! messages into bytes and bytes (from anyone, possibly hostile) into typed
//! messages or a typed error. See `README.md` beside this crate for the contract.

pub mod broker_url;
pub mod codec;
pub mod crypto;
pub mod label;
pub mod message;
pub mod name;
pub mod release;
pub mod samples;
pub mod spec;
pub mod token;
pub mod topic;
pub mod wire;

pub use broker_url::{BrokerNodes, BrokerUrl, InvalidBrokerUrl};
pub use codec::{decode, encode, DecodeError, Envelope, MessageKind};
pub use label::{validate_label, InvalidLabel};
pub use message::*;
pub use name::{check_name, InvalidName, NameKind, TenantName, WorkloadName};
pub use topic::{DeviceId, InvalidDeviceId, TopicKind};

/// Major version: bumped only for changes old peers cannot read. It is also in
/// the topic root (`baton/v1/`), so a v2 fleet can share a broker with v1.
pub const PROTOCOL_MAJOR: u8 = 1;
/// Minor version: bumped when fields are appended (see `codec` for the rule).
pub const PROTOCOL_MINOR: u8 = 10;
