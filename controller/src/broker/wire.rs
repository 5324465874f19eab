//! MQTT 3.1.1 framing for the embedded broker: split a byte stream into
//! packets, read each kind a client sends, write each kind a server sends.
//! Pure; never panics on any input.

/// Control packet types (high nibble of the first byte).
pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// CONNACK: the client's protocol level is not 3.1.1.
pub const BAD_PROTOCOL: u8 = 1;
/// CONNACK: the client id is not acceptable.
pub const BAD_CLIENT_ID: u8 = 2;
/// SUBACK: the subscription is refused.
pub const SUBSCRIBE_FAILED: u8 = 0x80;

/// CONNACK return codes.
pub const BAD_CREDENTIALS: u8 = 4;
pub const NOT_AUTHORIZED: u8 = 5;
/// CONNACK: the server cannot take the connection now.
pub const SERVER_UNAVAILABLE: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("remaining length is not a valid MQTT varint")]
    BadLength,
    #[error("packet of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(usize, usize),
    #[error("malformed {0} packet")]
    Malformed(&'static str),
    #[error("unsupported protocol {0:?} level {1} (MQTT 3.1.1 only)")]
    Protocol(String, u8),
}

/// If `buf` starts with a whole packet: (header length, total length).
/// `Ok(None)` means more bytes are needed.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, WireError> {
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let header = 2 + i;
            let total = header + len;
            if total > max {
                return Err(WireError::TooLarge(total, max));
            }
            return Ok((buf.len() >= total).then_some((header, total)));
        }
    }
    Err(WireError::BadLength)
}

/// The whole length of the packet `buf` starts with, once its fixed header is in.
pub fn declared_len(buf: &[u8]) -> Option<usize> {
    let mut len: usize = 0;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(2 + i + len);
        }
    }
    None
}

fn encode_len(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed(self.what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn string(&mut self) -> Result<String, WireError> {
        let what = self.what;
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| WireError::Malformed(what))
    }
}

/// A CONNECT packet's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub client_id: String,
    pub clean_session: bool,
    pub keep_alive: u16,
    /// (topic, message, qos, retain).
    pub will: Option<(String, Vec<u8>, u8, bool)>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

/// Parses a whole CONNECT packet (fixed header included).
pub fn parse_connect(packet: &[u8]) -> Result<Connect, WireError> {
    if packet.first().map(|b| b >> 4) != Some(CONNECT) {
        return Err(WireError::Malformed("CONNECT"));
    }
    let (header, total) = frame(packet, usize::MAX)?.ok_or(WireError::Malformed("CONNECT"))?;
    let mut r = Reader { buf: &packet[header..total], what: "CONNECT" };
    let name = r.string()?;
    let level = r.u8()?;
    if name != "MQTT" || level != 4 {
        return Err(WireError::Protocol(name, level));
    }
    let flags = r.u8()?;
    // §3.1.2.3: the reserved bit is 0; §3.1.2.6: no Will, no Will QoS or
    // retain; QoS 3 does not exist; §3.1.2.9: no password without a username.
    let will_bits = flags & 0x38;
    if flags & 0x01 != 0
        || (flags & 0x04 == 0 && will_bits != 0)
        || (flags >> 3) & 0x03 == 3
        || (flags & 0x40 != 0 && flags & 0x80 == 0)
    {
        return Err(WireError::Malformed("CONNECT"));
    }
    let keep_alive = r.u16()?;
    let client_id = r.string()?;
    let will = if flags & 0x04 != 0 {
        let topic = r.string()?;
        let message = r.bytes()?.to_vec();
        Some((topic, message, (flags >> 3) & 0x03, flags & 0x20 != 0))
    } else {
        None
    };
    let username = if flags & 0x80 != 0 { Some(r.string()?) } else { None };
    let password = if flags & 0x40 != 0 { Some(r.bytes()?.to_vec()) } else { None };
    if !r.buf.is_empty() {
        return Err(WireError::Malformed("CONNECT"));
    }
    Ok(Connect { client_id, clean_session: flags & 0x02 != 0, keep_alive, will, username, password })
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Callers pass fields that came from a parsed packet or our own short
    // credentials: all under 64 KiB.
    out.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(&b[..b.len().min(u16::MAX as usize)]);
}

/// Encodes a CONNECT.
pub fn encode_connect(c: &Connect) -> Vec<u8> {
    let mut body = Vec::new();
    put_bytes(&mut body, b"MQTT");
    body.push(4);
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    if let Some((_, _, qos, retain)) = &c.will {
        flags |= 0x04 | ((qos & 0x03) << 3);
        if *retain {
            flags |= 0x20;
        }
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&c.keep_alive.to_be_bytes());
    put_bytes(&mut body, c.client_id.as_bytes());
    if let Some((topic, message, _, _)) = &c.will {
        put_bytes(&mut body, topic.as_bytes());
        put_bytes(&mut body, message);
    }
    if let Some(u) = &c.username {
        put_bytes(&mut body, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_bytes(&mut body, p);
    }
    let mut out = vec![CONNECT << 4];
    encode_len(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

pub fn connack(session_present: bool, code: u8) -> [u8; 4] {
    [CONNACK << 4, 2, u8::from(session_present && code == 0), code]
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK for packet `id`.
pub fn ack(kind: u8, id: u16) -> [u8; 4] {
    // PUBREL's fixed header has the reserved bits 0010.
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    let [hi, lo] = id.to_be_bytes();
    [kind << 4 | flags, 2, hi, lo]
}

pub const PINGRESP_BYTES: [u8; 2] = [PINGRESP << 4, 0];

/// SUBACK for packet `id`: one return code per filter, in order.
pub fn suback(id: u16, codes: &[u8]) -> Vec<u8> {
    let mut out = vec![SUBACK << 4];
    encode_len(2 + codes.len(), &mut out);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(codes);
    out
}

/// A PUBLISH packet's fields, borrowed from the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish<'a> {
    pub topic: &'a str,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// 0 at QoS 0 (which has none).
    pub id: u16,
    pub payload: &'a [u8],
}

/// Parses a whole PUBLISH packet whose fixed header is `header` bytes.
pub fn parse_publish(packet: &[u8], header: usize) -> Result<Publish<'_>, WireError> {
    let first = *packet.first().ok_or(WireError::Malformed("PUBLISH"))?;
    let qos = (first >> 1) & 0x03;
    // QoS 3 does not exist; a QoS 0 message is never a duplicate (§3.3.1.1).
    if qos == 3 || (qos == 0 && first & 0x08 != 0) {
        return Err(WireError::Malformed("PUBLISH"));
    }
    let mut r = Reader { buf: &packet[header.min(packet.len())..], what: "PUBLISH" };
    let topic = std::str::from_utf8(r.bytes()?).map_err(|_| WireError::Malformed("PUBLISH"))?;
    let id = if qos > 0 { r.u16()? } else { 0 };
    if qos > 0 && id == 0 {
        return Err(WireError::Malformed("PUBLISH"));
    }
    Ok(Publish { topic, qos, retain: first & 0x01 != 0, dup: first & 0x08 != 0, id, payload: r.buf })
}

/// Appends a PUBLISH packet to `out`.
pub fn encode_publish(out: &mut Vec<u8>, topic: &str, payload: &[u8], qos: u8, retain: bool, id: u16) {
    let id_len = if qos > 0 { 2 } else { 0 };
    out.push(PUBLISH << 4 | (qos & 0x03) << 1 | u8::from(retain));
    encode_len(2 + topic.len() + id_len + payload.len(), out);
    put_bytes(out, topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// The packet id of a whole PUBACK, PUBREC, PUBREL or PUBCOMP.
pub fn packet_id(packet: &[u8], header: usize) -> Result<u16, WireError> {
    let mut r = Reader { buf: &packet[header.min(packet.len())..], what: "acknowledgement" };
    r.u16()
}

/// The packet id and (filter, requested QoS) pairs of a whole SUBSCRIBE packet.
pub fn parse_subscribe(packet: &[u8], header: usize) -> Result<(u16, Vec<(String, u8)>), WireError> {
    let mut r = Reader { buf: &packet[header.min(packet.len())..], what: "SUBSCRIBE" };
    let id = r.u16()?;
    if id == 0 || packet.first() != Some(&(SUBSCRIBE << 4 | 0x02)) {
        return Err(WireError::Malformed("SUBSCRIBE"));
    }
    let mut filters = Vec::new();
    while !r.buf.is_empty() {
        let filter = r.string()?;
        let qos = r.u8()?;
        if qos > 2 {
            return Err(WireError::Malformed("SUBSCRIBE"));
        }
        filters.push((filter, qos));
    }
    if filters.is_empty() {
        return Err(WireError::Malformed("SUBSCRIBE"));
    }
    Ok((id, filters))
}

/// The packet id and filters of a whole UNSUBSCRIBE packet.
pub fn parse_unsubscribe(packet: &[u8], header: usize) -> Result<(u16, Vec<String>), WireError> {
    let mut r = Reader { buf: &packet[header.min(packet.len())..], what: "UNSUBSCRIBE" };
    let id = r.u16()?;
    if id == 0 || packet.first() != Some(&(UNSUBSCRIBE << 4 | 0x02)) {
        return Err(WireError::Malformed("UNSUBSCRIBE"));
    }
    let mut filters = Vec::new();
    while !r.buf.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(WireError::Malformed("UNSUBSCRIBE"));
    }
    Ok((id, filters))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Connect {
        Connect {
            client_id: "pi-1".into(),
            clean_session: false,
            keep_alive: 30,
            will: Some(("baton/v1/dev/pi-1/presence".into(), vec![1, 2, 3], 1, true)),
            username: Some("pi-1".into()),
            password: Some(b"secret".to_vec()),
        }
    }

    #[test]
    fn connect_round_trips_and_frames() {
        let bytes = encode_connect(&sample());
        assert_eq!(frame(&bytes, 1 << 20).unwrap(), Some((2, bytes.len())));
        assert_eq!(frame(&bytes[..bytes.len() - 1], 1 << 20).unwrap(), None);
        assert_eq!(declared_len(&bytes[..2]), Some(bytes.len()));
        assert_eq!(declared_len(&[0x30, 0x80]), None, "the length goes on");
        assert_eq!(parse_connect(&bytes).unwrap(), sample());
        let bare = Connect { will: None, username: None, password: None, ..sample() };
        assert_eq!(parse_connect(&encode_connect(&bare)).unwrap(), bare);
    }

    #[test]
    fn rumqttc_style_packets_parse() {
        // PUBLISH QoS 1 "a/b", id 7, payload "x"; SUBSCRIBE id 1 "a/+" QoS 1.
        let publish = [0x33, 8, 0, 3, b'a', b'/', b'b', 0, 7, b'x'];
        assert_eq!(frame(&publish, 100).unwrap(), Some((2, 10)));
        let p = parse_publish(&publish, 2).unwrap();
        assert_eq!((p.topic, p.qos, p.retain, p.dup, p.id, p.payload), ("a/b", 1, true, false, 7, &b"x"[..]));
        let mut again = Vec::new();
        encode_publish(&mut again, "a/b", b"x", 1, true, 7);
        assert_eq!(again, publish.to_vec());
        let subscribe = [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'+', 1];
        assert_eq!(parse_subscribe(&subscribe, 2).unwrap(), (1, vec![("a/+".to_string(), 1)]));
        let unsubscribe = [0xa2, 7, 0, 2, 0, 3, b'a', b'/', b'+'];
        assert_eq!(parse_unsubscribe(&unsubscribe, 2).unwrap(), (2, vec!["a/+".to_string()]));
        assert_eq!(packet_id(&ack(PUBACK, 0x1234), 2).unwrap(), 0x1234);
        assert_eq!(ack(PUBREL, 1)[0], 0x62);
        assert_eq!(suback(3, &[1, SUBSCRIBE_FAILED]), vec![0x90, 4, 0, 3, 1, 0x80]);
        assert_eq!(connack(true, 0), [0x20, 2, 1, 0]);
        assert_eq!(connack(true, BAD_CREDENTIALS), [0x20, 2, 0, 4], "a refusal never says a session is present");
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        assert_eq!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 1], 1 << 30), Err(WireError::BadLength));
        assert!(matches!(frame(&[0x30, 0xff, 0x7f], 1000), Err(WireError::TooLarge(..))));
        for n in 0..40 {
            let mut bytes = encode_connect(&sample());
            bytes.truncate(n);
            let _ = parse_connect(&bytes);
            let _ = parse_publish(&bytes, 2);
            let _ = parse_publish(&bytes, 200);
            let _ = parse_subscribe(&bytes, 2);
            let _ = parse_unsubscribe(&bytes, 2);
            let _ = packet_id(&bytes, 2);
        }
        // QoS 3, and QoS 1 with packet id 0, are malformed.
        assert!(parse_publish(&[0x36, 5, 0, 1, b'a', 0, 1], 2).is_err());
        assert!(parse_publish(&[0x32, 5, 0, 1, b'a', 0, 0], 2).is_err());
        let mut v3 = encode_connect(&sample());
        v3[8] = 3;
        assert!(matches!(parse_connect(&v3), Err(WireError::Protocol(_, 3))));
        assert!(parse_subscribe(&[0x82, 2, 0, 1], 2).is_err());
        // What Mosquitto refuses too: reserved and contradictory CONNECT flags,
        // DUP at QoS 0, SUBSCRIBE with the wrong fixed-header flags or id 0.
        for (mask, set) in [(0xff, 0x01), (0xfb, 0x08), (0xff, 0x1c), (0x7f, 0x40)] {
            let mut bad = encode_connect(&sample());
            bad[9] = (bad[9] & mask) | set;
            assert!(parse_connect(&bad).is_err(), "flags {:#04x} accepted", bad[9]);
        }
        assert!(parse_publish(&[0x38, 3, 0, 1, b'a'], 2).is_err());
        assert!(parse_subscribe(&[0x80, 6, 0, 1, 0, 1, b'a', 0], 2).is_err());
        assert!(parse_subscribe(&[0x82, 6, 0, 0, 0, 1, b'a', 0], 2).is_err());
        assert!(parse_unsubscribe(&[0xa2, 5, 0, 0, 0, 1, b'a'], 2).is_err());
        assert!(parse_subscribe(&[0x82, 6, 0, 1, 0, 1, b'a', 3], 2).is_err(), "QoS 3 asked");
    }
}
