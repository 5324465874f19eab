//! Any bytes on any topic: decoding never panics, and whatever decodes
//! encodes back to bytes that decode to the same message.
#![no_main]
use baton_protocol::{codec::decode_on, decode, encode, TopicKind};
use libfuzzer_sys::fuzz_target;

const TOPICS: [TopicKind; 9] = [
    TopicKind::Presence,
    TopicKind::Inventory,
    TopicKind::Heartbeat,
    TopicKind::Report,
    TopicKind::Desired,
    TopicKind::Cmd,
    TopicKind::CmdRes,
    TopicKind::Enroll,
    TopicKind::EnrollRes,
];

fuzz_target!(|data: &[u8]| {
    if let Ok((_, msg)) = decode(data) {
        if let Ok(bytes) = encode(&msg) {
            assert_eq!(decode(&bytes).map(|(_, m)| m).ok(), Some(msg), "a message did not survive a round trip");
        }
    }
    for kind in TOPICS {
        let _ = decode_on(kind, data);
    }
});
