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
use tracing::warn;

/// Where the password issued at enrollment is kept.
pub fn password_path(data_dir: &Path) -> PathBuf {
    data_dir.join("state").join("mqtt.pw")
}

/// A parsed join token (the format is the protocol's).
pub use baton_protocol::token::JoinToken as Token;

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
    /// The controller answered, but what it gave cannot be used (not tried
    /// again through another node: the token was spent).
    #[error("{0}")]
    Answer(String),
}

/// Enrolls through the first broker node that answers (each given
/// `timeout`); on success the password and the pinned key are on disk.
pub async fn join(config: &AgentConfig, token: &Token, timeout: Duration) -> Result<(), JoinError> {
    let pw_path = password_path(&config.data_dir);
    if pw_path.exists() {
        return Err(JoinError::AlreadyJoined(pw_path));
    }
    let key = crate::trust::load_or_create_identity(&config.data_dir)?;
    let mut last = None;
    for broker in config.brokers.all() {
        match join_through(config, broker, &key, token, timeout).await {
            // A node that cannot be reached or does not answer: the next one.
            Err(e @ (JoinError::Other(_) | JoinError::Timeout(_))) => {
                warn!(%broker, error = %e, "cannot enroll through this broker node");
                last = Some(e);
            }
            done => return done,
        }
    }
    Err(last.unwrap_or_else(|| JoinError::Other("no broker node to enroll through".into())))
}

async fn join_through(
    config: &AgentConfig,
    broker: &baton_protocol::BrokerUrl,
    key: &crypto::DeviceKey,
    token: &Token,
    timeout: Duration,
) -> Result<(), JoinError> {
    let pw_path = password_path(&config.data_dir);
    let id = &config.device_id;
    let mut opts = MqttOptions::new(id.as_str(), broker.host.clone(), broker.port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_credentials(baton_protocol::token::join_username(&token.id), token.secret.clone());
    // Over TLS, the gateway must prove it holds the key the token names.
    opts.set_transport(
        crate::tls::transport(broker, &[token.controller_key], config.mqtt_ca_file.as_deref())
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
                Err(e) => return Err(JoinError::Other(format!("broker {broker}: {e}"))),
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
        .map_err(|e| JoinError::Answer(format!("cannot open the issued password: {e}")))?;
    crate::runtime::layout::write_private(&pw_path, &password)?;
    let pin = format!("ed25519:{}\n", crypto::hex(&token.controller_key));
    crate::runtime::layout::write_atomic(&crate::trust::pinned_key_path(&config.data_dir), pin.as_bytes())?;
    Ok(())
}
