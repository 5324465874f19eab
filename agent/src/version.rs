//! The agent's version, stamped into its binary where `baton agent publish`
//! finds it (`baton_protocol::release::find_version_stamp`): the crate's
//! version, or `BATON_AGENT_VERSION` when the build sets it
//! (`BATON_AGENT_VERSION=1.4.0-rc1 cargo build -p baton-agent`). Read from
//! the binary's own bytes at run time, so the version reported is always
//! the one a publisher reads from the same file.

use std::sync::OnceLock;

use baton_protocol::release::{stamp_prefix, VERSION_STAMP_LEN, VERSION_STAMP_PREFIX_LEN};

const PREFIX_LEN: usize = VERSION_STAMP_PREFIX_LEN;
const VERSION: &str = match option_env!("BATON_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

const fn stamp() -> [u8; PREFIX_LEN + VERSION_STAMP_LEN] {
    let mut out = [0u8; PREFIX_LEN + VERSION_STAMP_LEN];
    let prefix = stamp_prefix();
    let mut i = 0;
    while i < PREFIX_LEN {
        out[i] = prefix[i];
        i += 1;
    }
    let v = VERSION.as_bytes();
    assert!(!v.is_empty() && v.len() < VERSION_STAMP_LEN, "the agent version must fit its stamp");
    let mut j = 0;
    while j < v.len() {
        out[PREFIX_LEN + j] = v[j];
        j += 1;
    }
    out
}

#[used]
static STAMP: [u8; PREFIX_LEN + VERSION_STAMP_LEN] = stamp();

/// This agent's version, as stamped in its binary.
pub fn version() -> &'static str {
    static READ: OnceLock<String> = OnceLock::new();
    READ.get_or_init(|| {
        // SAFETY: a volatile read of a static that is always initialised; it
        // only keeps the compiler from using the constant instead of the bytes.
        let bytes = unsafe { std::ptr::read_volatile(&STAMP) };
        baton_protocol::release::find_version_stamp(&bytes).unwrap_or(VERSION).to_owned()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_stamp_reads_back_as_the_build_version() {
        assert_eq!(super::version(), super::VERSION);
    }

    #[test]
    fn the_binary_holds_its_stamp_once() {
        let bin = std::fs::read("/proc/self/exe").unwrap();
        let prefix = baton_protocol::release::version_stamp_prefix();
        let found = bin.windows(prefix.len()).filter(|w| *w == prefix).count();
        assert_eq!(found, 1, "a second copy of the prefix would be taken for the stamp");
    }
}
