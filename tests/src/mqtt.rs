//! A raw MQTT client for tests that play a misbehaving device or watch the wire.

use std::time::{Duration, Instant};

use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};

pub struct RawClient {
    pub client: Client,
    conn: Connection,
}

impl RawClient {
    pub fn connect(port: u16, id: &str) -> RawClient {
        Self::try_connect(port, id, None)
            .unwrap_or_else(|e| panic!("test client cannot connect to 127.0.0.1:{port}: {e}"))
    }

    /// Connects with optional (username, password); the broker's refusal is an error.
    pub fn try_connect(port: u16, id: &str, credentials: Option<(&str, &str)>) -> Result<RawClient, String> {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, password)) = credentials {
            opts.set_credentials(user, password);
        }
        let (client, mut conn) = Client::new(opts, 64);
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(RawClient { client, conn }),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("connection ended".into())
    }

    /// Subscribes and returns the broker's answer: true if granted.
    pub fn try_subscribe(&mut self, filter: &str) -> bool {
        self.client.subscribe(filter, QoS::AtLeastOnce).expect("subscribe");
        for ev in self.conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    return ack.return_codes.iter().all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure));
                }
                Ok(_) => {}
                // A broker (or gateway) may answer a forbidden subscription by disconnecting.
                Err(_) => return false,
            }
        }
        false
    }

    /// Publishes at QoS 1 and waits for the broker's ack, so the message is in.
    pub fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) {
        if let Err(e) = self.try_publish(topic, payload, retain) {
            panic!("publish to {topic} failed: {e}");
        }
    }

    /// As `publish`, but returns the connection error (e.g. a broker refusing the size).
    pub fn try_publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload).map_err(|e| e.to_string())?;
        for ev in self.conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("connection ended".into())
    }

    /// Subscribes and returns once the broker acknowledged it.
    pub fn subscribe(&mut self, filter: &str) {
        self.client.subscribe(filter, QoS::AtLeastOnce).expect("subscribe");
        for ev in self.conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("subscribe to {filter} failed: {e}"),
            }
        }
    }

    /// The next publish received within `timeout` (subscribe first): (topic, payload, retain).
    pub fn next_message(&mut self, timeout: Duration) -> Option<(String, Vec<u8>, bool)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.conn.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Some((p.topic, p.payload.to_vec(), p.retain)),
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => panic!("test client lost the broker: {e}"),
            }
        }
        None
    }
}

/// Waits (30 s at most) for a report from a device, on a client subscribed to
/// its report topic, that satisfies `ok`; panics with the last one seen.
pub fn wait_report(
    watch: &mut RawClient,
    what: &str,
    ok: impl Fn(&baton_protocol::Report) -> bool,
) -> baton_protocol::Report {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some((_, payload, _)) = watch.next_message(Duration::from_millis(500)) {
            if let Ok((_, baton_protocol::Message::Report(r))) = baton_protocol::decode(&payload) {
                if ok(&r) {
                    return r;
                }
                last = Some(r);
            }
        }
    }
    panic!("no report with {what} within 30 s; last: {last:?}");
}
