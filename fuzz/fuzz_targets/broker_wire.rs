//! Any bytes from a client of the embedded broker: framing and every packet
//! parser answer with a value or an error, never a panic; a CONNECT that
//! parses encodes back to one that parses the same.
#![no_main]
use baton_controller::broker::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((header, total))) = wire::frame(data, 1 << 20) else { return };
    let packet = &data[..total];
    if let Ok(c) = wire::parse_connect(packet) {
        assert_eq!(wire::parse_connect(&wire::encode_connect(&c)).ok(), Some(c), "a CONNECT did not survive a round trip");
    }
    if let Ok(p) = wire::parse_publish(packet, header) {
        let mut again = Vec::new();
        wire::encode_publish(&mut again, p.topic, p.payload, p.qos, p.retain, p.id);
        let Ok(Some((again_header, _))) = wire::frame(&again, usize::MAX) else { panic!("an encoded PUBLISH does not frame") };
        let reparsed = wire::parse_publish(&again, again_header);
        assert!(reparsed.is_ok_and(|r| r.topic == p.topic && r.payload == p.payload), "a PUBLISH did not survive");
    }
    let _ = wire::parse_subscribe(packet, header);
    let _ = wire::parse_unsubscribe(packet, header);
    let _ = wire::packet_id(packet, header);
});
