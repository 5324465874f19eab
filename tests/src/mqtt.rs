//! A raw MQTT client for tests that play a misbehaving device or watch the wire.

use std::time::Duration;

use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};

pub struct RawClient {
    pub client: Client,
    conn: Connection,
}

impl RawClient {
    pub fn connect(port: u16, id: &str) -> RawClient {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(opts, 64);
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("test client cannot connect to 127.0.0.1:{port}: {e}"),
            }
        }
        RawClient { client, conn }
    }

    /// Publishes at QoS 1 and waits for the broker's ack, so the message is in.
    pub fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .expect("queue publish");
        for ev in self.conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("publish to {topic} failed: {e}"),
            }
        }
    }

    /// Subscribes and returns the first publish on `filter` within `timeout`.
    pub fn first_message(
        &mut self,
        filter: &str,
        timeout: Duration,
    ) -> Option<(String, Vec<u8>, bool)> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .expect("subscribe");
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            match self.conn.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    return Some((p.topic, p.payload.to_vec(), p.retain))
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => panic!("test client lost the broker: {e}"),
            }
        }
        None
    }
}
