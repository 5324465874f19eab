//! Any text as a workload manifest: a result or an error naming the field,
//! never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = baton_controller::workload::parse("fuzz.yaml", text);
    }
});
