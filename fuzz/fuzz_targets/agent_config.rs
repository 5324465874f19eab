//! Any text as /etc/baton/agent.toml: a configuration or an error naming the
//! line and field, never a panic.
#![no_main]
use std::path::Path;

use baton_agent::config::{AgentConfig, FileConfig, Overrides};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/etc/baton/agent.toml");
    if let Ok(file) = FileConfig::parse(path, text) {
        // A machine id that always exists: the one of the fuzzing machine.
        let _ = AgentConfig::resolve(file, path, Overrides::default(), Path::new("/etc/machine-id"));
    }
});
