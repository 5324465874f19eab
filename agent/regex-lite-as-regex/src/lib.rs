//! `regex` as its dependants in Baton's tree call it, answered by
//! `regex-lite`.
//!
//! What differs from the full crate, and why it does not matter here: the
//! classes `\w`, `\d`, `\s` and case folding are ASCII only (the patterns
//! that reach this crate — OCI image references, Intel RDT schemata, CPU
//! lists, protobuf file names at build time — are ASCII by their specs;
//! Docker's own reference grammar is Go's ASCII `\w`); there is no
//! `regex::bytes`; and matching is slower (a backtracker and a PikeVM, no
//! lazy DFA), which patterns run once per container start never notice.
//! A dependency that needs more than this fails to compile, it does not
//! silently change behaviour.

pub use regex_lite::*;
