//! `baton-agent join TOKEN`: enrolls this device once. The token
//! (`baton1.<id>.<secret>.<controller key>`, from `baton token create`)
//! admits a join-only MQTT session; the agent sends its public key, gets its
//! MQTT password back sealed to that key, keeps it in `state/mqtt.pw` (0600),
//! and pins the controller key the token carried. Nothing secret leaves the
//! device; nothing but the token has to be copied to it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_protocol::crypto;
use baton_protocol::{decode, encode, EnrollRequest, Message, TopicKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::config::AgentConfig;

/// Where the password issued at enrollment is kept.
pub fn password_path(data_dir: &Path) -> PathBuf {
    data_dir.join("state").join("mqtt.pw")
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
    pub controller_key: [u8; 32],
}

/// The secret stays out of logs and error messages.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}, secret hidden)", self.id)
    }
}

impl std::str::FromStr for Token {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || "not a Baton join token (expected baton1.<id>.<secret>.<key>, from `baton token create`)".to_string();
        let mut parts = s.trim().split('.');
        let (Some("baton1"), Some(id), Some(secret), Some(key), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let hex = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(id, 16) || !hex(secret, 64) {
            return Err(bad());
        }
        let controller_key = crypto::parse_key(key).map_err(|_| bad())?;
        Ok(Token { id: id.into(), secret: secret.into(), controller_key })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("already enrolled ({0} exists); remove it to join again")]
    AlreadyJoined(PathBuf),
    #[error("the broker refused the token (unknown, expired or used up): {0}")]
    Refused(String),
    #[error("the controller refused to enroll this device: {0}")]
    Controller(String),
    #[error("no answer from the controller within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Enrolls; on success the password and the pinned key are on disk.
pub async fn join(config: &AgentConfig, token: &Token, timeout: Duration) -> Result<(), JoinError> {
    let pw_path = password_path(&config.data_dir);
    if pw_path.exists() {
        return Err(JoinError::AlreadyJoined(pw_path));
    }
    let key = crate::trust::load_or_create_identity(&config.data_dir)?;
    let id = &config.device_id;
    let mut opts = MqttOptions::new(id.as_str(), config.broker.host.clone(), config.broker.port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_credentials(format!("join:{}", token.id), token.secret.clone());
    // Over TLS, the gateway must prove it holds the key the token names.
    opts.set_transport(
        crate::tls::transport(&config.broker, &[token.controller_key], config.mqtt_ca_file.as_deref())
            .map_err(JoinError::Other)?,
    );
    let (client, mut events) = AsyncClient::new(opts, 8);
    let request = encode(&Message::EnrollRequest(EnrollRequest {
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        sealing_key: key.public().to_vec(),
    }))
    .map_err(|e| JoinError::Other(e.to_string()))?;
    let answer = tokio::time::timeout(timeout, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .subscribe(id.topic(TopicKind::EnrollRes), QoS::AtLeastOnce)
                        .await
                        .map_err(|e| JoinError::Other(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    client
                        .publish(id.topic(TopicKind::Enroll), QoS::AtLeastOnce, false, request.clone())
                        .await
                        .map_err(|e| JoinError::Other(e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == id.topic(TopicKind::EnrollRes) => {
                    return match decode(&p.payload) {
                        Ok((_, Message::EnrollResponse(r))) => Ok(r),
                        Ok(_) | Err(_) => Err(JoinError::Other("undecodable enrollment answer".into())),
                    };
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    return Err(JoinError::Refused(format!("{code:?}")))
                }
                Err(e) => return Err(JoinError::Other(format!("broker {}: {e}", config.broker))),
            }
        }
    })
    .await
    .map_err(|_| JoinError::Timeout(timeout))??;
    let _ = client.disconnect().await;
    if let Some(why) = answer.error {
        return Err(JoinError::Controller(why));
    }
    let password = key
        .unseal(&crypto::secret_context(id.as_str(), "enroll", "password"), &answer.sealed_password)
        .map_err(|e| JoinError::Other(format!("cannot open the issued password: {e}")))?;
    crate::runtime::layout::write_private(&pw_path, &password)?;
    let pin = format!("ed25519:{}\n", crypto::hex(&token.controller_key));
    crate::runtime::layout::write_atomic(&crate::trust::pinned_key_path(&config.data_dir), pin.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_strictly() {
        let key = crypto::hex(&[7; 32]);
        let good = format!("baton1.{}.{}.{key}", "ab".repeat(8), "cd".repeat(32));
        let t: Token = good.parse().unwrap();
        assert_eq!((t.id.len(), t.secret.len(), t.controller_key), (16, 64, [7; 32]));
        for bad in [
            String::new(),
            good.replace("baton1", "baton2"),
            format!("{good}.x"),
            format!("baton1.{}.{}.{key}", "zz".repeat(8), "cd".repeat(32)),
            format!("baton1.{}.{}.{key}", "ab".repeat(8), "cd".repeat(31)),
            format!("baton1.{}.{}.abc", "ab".repeat(8), "cd".repeat(32)),
        ] {
            assert!(bad.parse::<Token>().is_err(), "{bad}");
        }
    }
}
