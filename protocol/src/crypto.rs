//! The contract's cryptography: controller signatures over desired documents
//! and secrets sealed to one device's key. Pure (no I/O beyond the OS random
//! source), shared by both sides so they cannot disagree on a byte.
//!
//! - **Signed desired documents.** The controller signs
//!   `DESIRED_CONTEXT || device id || 0x00 || encoded Desired` with Ed25519.
//!   The device id inside the signed bytes stops a document signed for one
//!   device from being replayed to another; the generation inside the
//!   document lets the agent refuse older ones.
//! - **Sealed secrets.** Each value is sealed for one device: an ephemeral
//!   X25519 key agreement with the device's static public key, HKDF-SHA256
//!   over both public keys and the context (device, workload, path), then
//!   ChaCha20-Poly1305. Only the holder of the device's private key opens it;
//!   moving a sealed value to another device, workload or path breaks it.
//!
//! Keys are 32-byte seeds. A device derives its X25519 key from its seed
//! through HKDF, so one file holds its whole identity.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::message::{Command, SignedDesired};

/// Domain separation for desired-document signatures.
const DESIRED_CONTEXT: &[u8] = b"baton/v1 desired document\0";
const SEAL_INFO: &[u8] = b"baton/v1 sealed secret";
const X25519_INFO: &[u8] = b"baton/v1 device x25519";
/// Bytes a sealed value adds to its plaintext: the ephemeral public key and the tag.
pub const SEAL_OVERHEAD: usize = 32 + 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("unsigned desired document")]
    Unsigned,
    #[error("unsigned command (a controller older than protocol 1.3, or not the controller)")]
    UnsignedCommand,
    #[error("signed by untrusted key ed25519:{0}")]
    UnknownKey(String),
    #[error("bad signature (forged or damaged)")]
    BadSignature,
    #[error("key is not 32 bytes (got {0})")]
    KeyLength(usize),
    #[error("cannot parse key {0:?}: use 64 hex digits, optionally prefixed with \"ed25519:\"")]
    KeyFormat(String),
    #[error("sealed value is {0} bytes, shorter than the {SEAL_OVERHEAD}-byte envelope")]
    SealedTooShort(usize),
    #[error("cannot open sealed value: not sealed for this device, or damaged")]
    Unseal,
    #[error("the system random source failed")]
    Random,
}

/// 32 random bytes from the OS.
pub fn random_seed() -> Result<[u8; 32], CryptoError> {
    let mut seed = [0u8; 32];
    SystemRandom::new().fill(&mut seed).map_err(|_| CryptoError::Random)?;
    Ok(seed)
}

/// HMAC-SHA256 of `data` under `key` (webhook bodies, so receivers can
/// check who sent them).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data);
    let mut out = [0; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 32-byte key from 64 hex digits, with or without an `ed25519:`/`x25519:` prefix.
pub fn parse_key(text: &str) -> Result<[u8; 32], CryptoError> {
    let t = text.trim();
    let digits = t.strip_prefix("ed25519:").or_else(|| t.strip_prefix("x25519:")).unwrap_or(t);
    let bad = || CryptoError::KeyFormat(text.chars().take(80).collect());
    if digits.len() != 64 || !digits.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn desired_message(device: &str, document: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DESIRED_CONTEXT.len() + device.len() + 1 + document.len());
    m.extend_from_slice(DESIRED_CONTEXT);
    m.extend_from_slice(device.as_bytes());
    m.push(0);
    m.extend_from_slice(document);
    m
}

/// What a command signature covers: a context of its own (a desired
/// document's signature can never pass for a command's), the device id, and
/// the command's id, deadline and action as postcard encodes them.
fn command_message(device: &str, cmd: &Command) -> Vec<u8> {
    let fields = postcard::to_allocvec(&(cmd.id, cmd.deadline_ms, &cmd.action)).unwrap_or_default();
    let mut m = Vec::with_capacity(COMMAND_CONTEXT.len() + device.len() + 1 + fields.len());
    m.extend_from_slice(COMMAND_CONTEXT);
    m.extend_from_slice(device.as_bytes());
    m.push(0);
    m.extend_from_slice(&fields);
    m
}

const COMMAND_CONTEXT: &[u8] = b"baton command v1\0";
const TIMED_COMMAND_CONTEXT: &[u8] = b"baton command v2\0";

/// What the 1.4 signature covers: everything the 1.3 one does, and `issued_ms`.
fn timed_command_message(device: &str, cmd: &Command) -> Vec<u8> {
    let fields = postcard::to_allocvec(&(cmd.id, cmd.deadline_ms, &cmd.action, cmd.issued_ms)).unwrap_or_default();
    let mut m = Vec::with_capacity(TIMED_COMMAND_CONTEXT.len() + device.len() + 1 + fields.len());
    m.extend_from_slice(TIMED_COMMAND_CONTEXT);
    m.extend_from_slice(device.as_bytes());
    m.push(0);
    m.extend_from_slice(&fields);
    m
}

/// The controller time a command carries, if it is signed (1.4): `None` for
/// a command of an older controller. Check `verify_command` first; this
/// checks the signature over the time with the same key.
pub fn command_issued_at(device: &str, cmd: &Command) -> Result<Option<u64>, CryptoError> {
    if cmd.time_signature.is_empty() {
        return Ok(None);
    }
    let key = <[u8; 32]>::try_from(cmd.key.as_slice()).map_err(|_| CryptoError::BadSignature)?;
    UnparsedPublicKey::new(&signature::ED25519, key)
        .verify(&timed_command_message(device, cmd), &cmd.time_signature)
        .map_err(|_| CryptoError::BadSignature)?;
    Ok(Some(cmd.issued_ms))
}

/// Checks that `cmd` was signed for `device` by one of `trusted`.
pub fn verify_command(trusted: &[[u8; 32]], device: &str, cmd: &Command) -> Result<(), CryptoError> {
    if cmd.signature.is_empty() {
        return Err(CryptoError::UnsignedCommand);
    }
    let key = trusted
        .iter()
        .find(|k| k.as_slice() == cmd.key.as_slice())
        .ok_or_else(|| CryptoError::UnknownKey(hex(&cmd.key)))?;
    UnparsedPublicKey::new(&signature::ED25519, key)
        .verify(&command_message(device, cmd), &cmd.signature)
        .map_err(|_| CryptoError::BadSignature)
}

/// The controller's Ed25519 signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: [u8; 32],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(ed25519:{})", hex(&self.public))
    }
}

impl SigningKey {
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        // `unchecked` only skips comparing against a public key we do not have.
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("every 32-byte seed is an Ed25519 key");
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Self { pair, public }
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Signs `cmd` for `device` (fills its `key` and `signature`, and its
    /// `time_signature` when it carries an `issued_ms`).
    pub fn sign_command(&self, device: &str, mut cmd: Command) -> Command {
        cmd.signature = self.pair.sign(&command_message(device, &cmd)).as_ref().to_vec();
        cmd.key = self.public.to_vec();
        cmd.time_signature = if cmd.issued_ms == 0 {
            Vec::new()
        } else {
            self.pair.sign(&timed_command_message(device, &cmd)).as_ref().to_vec()
        };
        cmd
    }

    /// Signs an encoded `Desired` message for `device`.
    pub fn sign_desired(&self, device: &str, document: Vec<u8>) -> SignedDesired {
        let signature = self.pair.sign(&desired_message(device, &document)).as_ref().to_vec();
        SignedDesired { key: self.public.to_vec(), signature, document }
    }
}

/// Checks a signed document for `device` against the trusted keys and returns
/// the encoded `Desired` inside. The caller still checks its generation.
pub fn verify_desired<'a>(
    trusted: &[[u8; 32]],
    device: &str,
    signed: &'a SignedDesired,
) -> Result<&'a [u8], CryptoError> {
    let key = trusted
        .iter()
        .find(|k| k.as_slice() == signed.key.as_slice())
        .ok_or_else(|| CryptoError::UnknownKey(hex(&signed.key)))?;
    UnparsedPublicKey::new(&signature::ED25519, key)
        .verify(&desired_message(device, &signed.document), &signed.signature)
        .map_err(|_| CryptoError::BadSignature)?;
    Ok(&signed.document)
}

/// A device's identity: the seed it generated on first start, never sent anywhere.
pub struct DeviceKey {
    secret: x25519_dalek::StaticSecret,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey(x25519:{})", hex(&self.public()))
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    // Lengths here are fixed and far below HKDF's 255 × 32 limit.
    prk.expand(info, Len(out.len())).and_then(|okm| okm.fill(out)).expect("HKDF output length is valid");
}

impl DeviceKey {
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let mut k = [0u8; 32];
        derive(&[], seed, &[X25519_INFO], &mut k);
        Self { secret: x25519_dalek::StaticSecret::from(k) }
    }

    /// The public key the controller seals to (reported in the inventory).
    pub fn public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.secret).to_bytes()
    }

    /// Opens a value sealed for this device under `context`.
    pub fn unseal(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(CryptoError::SealedTooShort(sealed.len()));
        }
        let (eph, body) = sealed.split_at(32);
        let mut eph_pub = [0u8; 32];
        eph_pub.copy_from_slice(eph);
        let shared = self.secret.diffie_hellman(&x25519_dalek::PublicKey::from(eph_pub));
        let key = seal_key(shared.as_bytes(), &eph_pub, &self.public(), context).ok_or(CryptoError::Unseal)?;
        let mut buf = body.to_vec();
        let n = key
            .open_in_place(Nonce::assume_unique_for_key([0u8; 12]), Aad::from(context), &mut buf)
            .map_err(|_| CryptoError::Unseal)?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

fn seal_key(shared: &[u8; 32], eph_pub: &[u8; 32], recipient: &[u8; 32], context: &[u8]) -> Option<LessSafeKey> {
    // An all-zero shared secret means a low-order point: refuse it.
    if shared.iter().all(|b| *b == 0) {
        return None;
    }
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph_pub);
    salt[32..].copy_from_slice(recipient);
    let mut k = [0u8; 32];
    derive(&salt, shared, &[SEAL_INFO, context], &mut k);
    UnboundKey::new(&CHACHA20_POLY1305, &k).ok().map(LessSafeKey::new)
}

/// Seals `plaintext` for the device whose public key is `recipient`. Every call
/// uses a fresh ephemeral key, so the (all-zero) nonce is never reused with a key.
pub fn seal(recipient: &[u8; 32], context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let eph = x25519_dalek::StaticSecret::from(random_seed()?);
    let eph_pub = x25519_dalek::PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&x25519_dalek::PublicKey::from(*recipient));
    let key = seal_key(shared.as_bytes(), &eph_pub, recipient, context).ok_or(CryptoError::Unseal)?;
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    out.extend_from_slice(&eph_pub);
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key([0u8; 12]), Aad::from(context), &mut body)
        .map_err(|_| CryptoError::Unseal)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// The context a secret file is sealed under: device, workload and path.
pub fn secret_context(device: &str, workload: &str, path: &str) -> Vec<u8> {
    [device.as_bytes(), workload.as_bytes(), path.as_bytes()].join(&0u8)
}

/// Symmetric encryption with a 32-byte key and a random nonce (the controller's
/// secrets at rest): `nonce || ciphertext || tag`.
pub fn encrypt(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; 12];
    SystemRandom::new().fill(&mut nonce).map_err(|_| CryptoError::Random)?;
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).map_err(|_| CryptoError::Random)?);
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body)
        .map_err(|_| CryptoError::Random)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

pub fn decrypt(key: &[u8; 32], aad: &[u8], data: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if data.len() < 12 + aead::MAX_TAG_LEN {
        return Err(CryptoError::SealedTooShort(data.len()));
    }
    let (nonce, body) = data.split_at(12);
    let mut n = [0u8; 12];
    n.copy_from_slice(nonce);
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).map_err(|_| CryptoError::Unseal)?);
    let mut buf = body.to_vec();
    let len = key
        .open_in_place(Nonce::assume_unique_for_key(n), Aad::from(aad), &mut buf)
        .map_err(|_| CryptoError::Unseal)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_signatures_bind_key_device_and_every_field() {
        use crate::message::CommandAction;
        let key = SigningKey::from_seed(&[1; 32]);
        let trusted = [key.public()];
        let cmd = Command {
            id: 7,
            deadline_ms: 1_000,
            action: CommandAction::Exec { workload: "w".into(), argv: vec!["id".into()] },
            key: Vec::new(),
            signature: Vec::new(),
            issued_ms: 0,
            time_signature: Vec::new(),
        };
        assert_eq!(verify_command(&trusted, "pi-a", &cmd), Err(CryptoError::UnsignedCommand));
        let signed = key.sign_command("pi-a", cmd.clone());
        assert_eq!(verify_command(&trusted, "pi-a", &signed), Ok(()));
        // Another device, another key, any changed field: refused.
        assert_eq!(verify_command(&trusted, "pi-b", &signed), Err(CryptoError::BadSignature));
        let other = SigningKey::from_seed(&[2; 32]).sign_command("pi-a", cmd.clone());
        assert!(matches!(verify_command(&trusted, "pi-a", &other), Err(CryptoError::UnknownKey(_))));
        let argv =
            Command { action: CommandAction::Exec { workload: "w".into(), argv: vec!["sh".into()] }, ..signed.clone() };
        assert_eq!(verify_command(&trusted, "pi-a", &argv), Err(CryptoError::BadSignature));
        let later = Command { deadline_ms: 2_000, ..signed.clone() };
        assert_eq!(verify_command(&trusted, "pi-a", &later), Err(CryptoError::BadSignature));
        let id = Command { id: 8, ..signed };
        assert_eq!(verify_command(&trusted, "pi-a", &id), Err(CryptoError::BadSignature));
    }

    #[test]
    fn the_controller_time_of_a_command_is_signed_with_it() {
        use crate::message::CommandAction;
        let key = SigningKey::from_seed(&[1; 32]);
        let cmd = Command {
            id: 7,
            deadline_ms: 61_000,
            action: CommandAction::Diagnostics,
            key: Vec::new(),
            signature: Vec::new(),
            issued_ms: 1_000,
            time_signature: Vec::new(),
        };
        let signed = key.sign_command("pi-a", cmd.clone());
        // A 1.3 agent checks the first signature only: still valid.
        assert_eq!(verify_command(&[key.public()], "pi-a", &signed), Ok(()));
        assert_eq!(command_issued_at("pi-a", &signed), Ok(Some(1_000)));
        // The time cannot be moved, nor the time signature borrowed by another device.
        let moved = Command { issued_ms: 50_000, ..signed.clone() };
        assert_eq!(command_issued_at("pi-a", &moved), Err(CryptoError::BadSignature));
        assert_eq!(command_issued_at("pi-b", &signed), Err(CryptoError::BadSignature));
        // Stripped (as by a 1.3 controller, or on the way): no time, old rules.
        let stripped = Command { issued_ms: 0, time_signature: Vec::new(), ..signed };
        assert_eq!(command_issued_at("pi-a", &stripped), Ok(None));
        let untimed = key.sign_command("pi-a", Command { issued_ms: 0, ..cmd });
        assert!(untimed.time_signature.is_empty());
    }

    #[test]
    fn a_signed_document_verifies_only_for_its_device_key_and_bytes() {
        let key = SigningKey::from_seed(&[7; 32]);
        let other = SigningKey::from_seed(&[8; 32]);
        let signed = key.sign_desired("pi-1", b"doc".to_vec());
        assert_eq!(verify_desired(&[key.public()], "pi-1", &signed).unwrap(), b"doc");
        // Another device's topic: the id is inside the signed bytes.
        assert_eq!(verify_desired(&[key.public()], "pi-2", &signed), Err(CryptoError::BadSignature));
        // A key the device does not trust.
        assert!(matches!(verify_desired(&[other.public()], "pi-1", &signed), Err(CryptoError::UnknownKey(_))));
        // Rotation: trusting both keys accepts either.
        assert!(verify_desired(&[other.public(), key.public()], "pi-1", &signed).is_ok());
        // A changed byte of the document.
        let mut forged = signed.clone();
        forged.document[0] ^= 1;
        assert_eq!(verify_desired(&[key.public()], "pi-1", &forged), Err(CryptoError::BadSignature));
        // A forger who names the trusted key but signs with its own.
        let mut forged = other.sign_desired("pi-1", b"doc".to_vec());
        forged.key = signed.key.clone();
        assert_eq!(verify_desired(&[key.public()], "pi-1", &forged), Err(CryptoError::BadSignature));
    }

    #[test]
    fn sealed_values_open_only_on_their_device_and_context() {
        let device = DeviceKey::from_seed(&[1; 32]);
        let thief = DeviceKey::from_seed(&[2; 32]);
        let ctx = secret_context("pi-1", "db", "/run/secrets/pw");
        let sealed = seal(&device.public(), &ctx, b"hunter2").unwrap();
        assert_eq!(sealed.len(), SEAL_OVERHEAD + 7);
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(device.unseal(&ctx, &sealed).unwrap(), b"hunter2");
        assert_eq!(thief.unseal(&ctx, &sealed), Err(CryptoError::Unseal));
        let moved = secret_context("pi-1", "web", "/run/secrets/pw");
        assert_eq!(device.unseal(&moved, &sealed), Err(CryptoError::Unseal));
        let mut damaged = sealed.clone();
        damaged[40] ^= 1;
        assert_eq!(device.unseal(&ctx, &damaged), Err(CryptoError::Unseal));
        assert_eq!(device.unseal(&ctx, &sealed[..10]), Err(CryptoError::SealedTooShort(10)));
        // Fresh ephemeral key every time.
        assert_ne!(seal(&device.public(), &ctx, b"hunter2").unwrap(), sealed);
        // A low-order public key is refused rather than sealing to everyone.
        assert!(seal(&[0; 32], &ctx, b"x").is_err());
    }

    #[test]
    fn at_rest_encryption_round_trips_and_detects_tampering() {
        let key = [9u8; 32];
        let data = encrypt(&key, b"secret/db", b"hunter2").unwrap();
        assert_eq!(decrypt(&key, b"secret/db", &data).unwrap(), b"hunter2");
        assert!(decrypt(&key, b"secret/other", &data).is_err());
        assert!(decrypt(&[1u8; 32], b"secret/db", &data).is_err());
        assert!(decrypt(&key, b"secret/db", &data[..5]).is_err());
    }

    #[test]
    fn keys_parse_from_hex_with_or_without_a_prefix() {
        let k = SigningKey::from_seed(&[3; 32]).public();
        assert_eq!(parse_key(&hex(&k)).unwrap(), k);
        assert_eq!(parse_key(&format!("ed25519:{}", hex(&k))).unwrap(), k);
        assert!(parse_key("ed25519:abc").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
        assert!(parse_key(&"é".repeat(32)).is_err());
    }
}
