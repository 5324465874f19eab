//! Just enough of MQTT 3.1.1 framing for the gateway: split a byte stream
//! into packets, read CONNECT, PUBLISH topics and SUBSCRIBE filters, and
//! write a CONNECT and a CONNACK. Pure; never panics on any input.

/// Control packet types (high nibble of the first byte).
pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const SUBSCRIBE: u8 = 8;

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

pub fn connack(code: u8) -> [u8; 4] {
    [CONNACK << 4, 2, 0, code]
}

/// The topic of a whole PUBLISH packet.
pub fn publish_topic(packet: &[u8], header: usize) -> Result<String, WireError> {
    let mut r = Reader { buf: &packet[header.min(packet.len())..], what: "PUBLISH" };
    r.string()
}

/// The topic filters of a whole SUBSCRIBE packet.
pub fn subscribe_filters(packet: &[u8], header: usize) -> Result<Vec<String>, WireError> {
    let mut r = Reader { buf: &packet[header.min(packet.len())..], what: "SUBSCRIBE" };
    r.u16()?;
    let mut filters = Vec::new();
    while !r.buf.is_empty() {
        filters.push(r.string()?);
        r.u8()?;
    }
    if filters.is_empty() {
        return Err(WireError::Malformed("SUBSCRIBE"));
    }
    Ok(filters)
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
        assert_eq!(parse_connect(&bytes).unwrap(), sample());
        let bare = Connect { will: None, username: None, password: None, ..sample() };
        assert_eq!(parse_connect(&encode_connect(&bare)).unwrap(), bare);
    }

    #[test]
    fn rumqttc_style_packets_parse() {
        // PUBLISH QoS 1 "a/b", id 7, payload "x"; SUBSCRIBE id 1 "a/+" QoS 1.
        let publish = [0x32, 8, 0, 3, b'a', b'/', b'b', 0, 7, b'x'];
        assert_eq!(frame(&publish, 100).unwrap(), Some((2, 10)));
        assert_eq!(publish_topic(&publish, 2).unwrap(), "a/b");
        let subscribe = [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'+', 1];
        assert_eq!(subscribe_filters(&subscribe, 2).unwrap(), vec!["a/+".to_string()]);
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        assert_eq!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 1], 1 << 30), Err(WireError::BadLength));
        assert!(matches!(frame(&[0x30, 0xff, 0x7f], 1000), Err(WireError::TooLarge(..))));
        for n in 0..40 {
            let mut bytes = encode_connect(&sample());
            bytes.truncate(n);
            let _ = parse_connect(&bytes);
            let _ = publish_topic(&bytes, 2);
            let _ = subscribe_filters(&bytes, 2);
        }
        let mut v3 = encode_connect(&sample());
        v3[8] = 3;
        assert!(matches!(parse_connect(&v3), Err(WireError::Protocol(_, 3))));
        assert!(subscribe_filters(&[0x82, 2, 0, 1], 2).is_err());
    }
}
