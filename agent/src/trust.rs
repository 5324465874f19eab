//! What the agent trusts: the controller's signing keys, and its own identity.
//!
//! - The device's identity is a 32-byte seed generated here on first start
//!   (`state/identity.key`, mode 0600) and never sent anywhere; its X25519
//!   public key travels in the inventory so the controller can seal secrets to it.
//! - A desired document is applied only when signed by a trusted controller
//!   key: the keys in the config (`controller_keys`), else the key pinned in
//!   `state/controller.pub` — pinned from the first signed document when none
//!   is configured (trust on first use, logged; configure the key to close that window).
//! - Secrets arrive sealed; they are opened in memory and written only to tmpfs.

use std::path::{Path, PathBuf};

use baton_protocol::crypto::{self, CryptoError, DeviceKey};
use baton_protocol::{codec, Command, Desired, Message, SignedDesired, TopicKind};
use tracing::warn;

use crate::runtime::layout::{write_atomic, write_private};

pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("state").join("identity.key")
}

pub fn pinned_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("state").join("controller.pub")
}

/// The device's key: loaded, or created once (the only write).
pub fn load_or_create_identity(data_dir: &Path) -> std::io::Result<DeviceKey> {
    let path = identity_path(data_dir);
    if let Some(key) = load_identity(data_dir)? {
        return Ok(key);
    }
    let seed = crypto::random_seed().map_err(std::io::Error::other)?;
    write_private(&path, crypto::hex(&seed).as_bytes())?;
    Ok(DeviceKey::from_seed(&seed))
}

/// The device's key, if it has one. A damaged key file is an error, not a new identity.
pub fn load_identity(data_dir: &Path) -> std::io::Result<Option<DeviceKey>> {
    let path = identity_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => crypto::parse_key(&text)
            .map(|seed| Some(DeviceKey::from_seed(&seed)))
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The controller keys this agent accepts documents from.
#[derive(Debug)]
pub struct Trust {
    configured: Vec<[u8; 32]>,
    pinned: Option<[u8; 32]>,
    pin_path: PathBuf,
}

impl Trust {
    pub fn load(configured: Vec<[u8; 32]>, data_dir: &Path) -> Self {
        let pin_path = pinned_key_path(data_dir);
        let pinned = match std::fs::read_to_string(&pin_path) {
            Ok(text) => match crypto::parse_key(&text) {
                Ok(k) => Some(k),
                Err(e) => {
                    // Refusing everything is the safe side: an operator re-pins by deleting the file.
                    warn!(path = %pin_path.display(), error = %e, "pinned controller key unreadable; no document will be accepted");
                    Some([0; 32])
                }
            },
            Err(_) => None,
        };
        Self { configured, pinned, pin_path }
    }

    /// The keys documents (and the TLS gateway's CA) must carry.
    pub fn keys(&self) -> Vec<[u8; 32]> {
        if self.configured.is_empty() {
            self.pinned.into_iter().collect()
        } else {
            self.configured.clone()
        }
    }

    /// Verifies a signed document for `device` and returns the encoded
    /// `Desired` inside. With no key configured or pinned, the first signer is pinned.
    pub fn verify<'a>(&mut self, device: &str, signed: &'a SignedDesired) -> Result<&'a [u8], CryptoError> {
        if self.configured.is_empty() && self.pinned.is_none() {
            let key: [u8; 32] =
                signed.key.as_slice().try_into().map_err(|_| CryptoError::KeyLength(signed.key.len()))?;
            let document = crypto::verify_desired(&[key], device, signed)?;
            let text = format!("ed25519:{}\n", crypto::hex(&key));
            if let Err(e) = self
                .pin_path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| write_atomic(&self.pin_path, text.as_bytes()))
            {
                warn!(error = %e, "cannot persist the pinned controller key");
            }
            warn!(key = %text.trim(), "no controller key configured: trusting the first signer from now on (set controller_keys to avoid trust on first use)");
            self.pinned = Some(key);
            return Ok(document);
        }
        crypto::verify_desired(&self.keys(), device, signed)
    }
}

pub use crate::clock::MAX_COMMAND_WINDOW_MS;

/// A command signed by a trusted key for this device. Returns the
/// controller's time it carries, signed (None: from a controller older than
/// 1.4); whether it is fresh is `ControllerClock::judge`'s to say.
pub fn check_command(trusted: &[[u8; 32]], device: &str, cmd: &Command) -> Result<Option<u64>, String> {
    if trusted.is_empty() {
        return Err("no controller key is trusted yet (none configured, no document received)".into());
    }
    crypto::verify_command(trusted, device, cmd).map_err(|e| e.to_string())?;
    crypto::command_issued_at(device, cmd).map_err(|e| format!("its time: {e}"))
}

pub fn seen_commands_path(data_dir: &Path) -> PathBuf {
    data_dir.join("state").join("commands.seen")
}

/// Command ids accepted, kept until their deadline: the same signed command
/// is carried out once (a listener that captured it cannot replay it while
/// it is still valid), also across agent restarts: the set is saved in
/// `state/commands.seen` each time a command is accepted, with the newest
/// controller time known then (`floor_ms`, where `ControllerClock` restarts
/// from). Bounded: the oldest deadlines go first past `CAP`.
///
/// File: `BSC2`, the floor (8 bytes), then 16 bytes per id (id, deadline);
/// files of agents before 1.4 hold only the ids (a multiple of 16 bytes).
#[derive(Debug, Default)]
pub struct SeenCommands {
    by_id: std::collections::HashMap<u64, u64>,
    /// The newest controller time known (saved with the ids).
    pub floor_ms: u64,
    /// Where `load` found the set, and `admit` saves it (`None`: memory only).
    saved_at: Option<PathBuf>,
}

impl SeenCommands {
    const CAP: usize = 4096;

    /// The saved set, without what expired by `now_ms`. A missing file is an
    /// empty set; a damaged one is read as far as it is whole (a torn tail
    /// cannot happen with `write_atomic`, but the file is not trusted to be whole).
    pub fn load(path: &Path, now_ms: u64) -> Self {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "accepted-command ids unreadable: starting with none");
                Vec::new()
            }
        };
        Self { saved_at: Some(path.to_path_buf()), ..Self::decode(&bytes, now_ms) }
    }

    const MAGIC: &'static [u8; 4] = b"BSC2";

    fn decode(bytes: &[u8], now_ms: u64) -> Self {
        let (floor_ms, bytes) = match bytes.split_at_checked(12) {
            // (An old file starting with these 4 bytes is one chance in 2^32: its ids would be lost, nothing worse.)
            Some((head, rest)) if head.starts_with(Self::MAGIC) => {
                (u64::from_le_bytes(head[4..12].try_into().unwrap_or_default()), rest)
            }
            _ => (0, bytes),
        };
        let mut by_id = std::collections::HashMap::new();
        for entry in bytes.chunks_exact(16).take(Self::CAP) {
            let (id, deadline) = entry.split_at(8);
            let id = u64::from_le_bytes(id.try_into().unwrap_or_default());
            let deadline = u64::from_le_bytes(deadline.try_into().unwrap_or_default());
            if deadline >= now_ms {
                by_id.insert(id, deadline);
            }
        }
        Self { by_id, floor_ms, saved_at: None }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.by_id.len() * 16);
        out.extend_from_slice(Self::MAGIC);
        out.extend_from_slice(&self.floor_ms.to_le_bytes());
        for (id, deadline) in &self.by_id {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&deadline.to_le_bytes());
        }
        out
    }

    pub fn admit(&mut self, cmd: &Command, now_ms: u64) -> Result<(), String> {
        self.by_id.retain(|_, deadline| *deadline >= now_ms);
        if self.by_id.contains_key(&cmd.id) {
            return Err(format!("command {} was already carried out (replayed)", cmd.id));
        }
        if self.by_id.len() >= Self::CAP {
            if let Some(oldest) = self.by_id.iter().min_by_key(|(_, d)| **d).map(|(id, _)| *id) {
                self.by_id.remove(&oldest);
            }
        }
        // A command without a deadline is remembered for the longest window.
        let deadline = if cmd.deadline_ms == 0 { now_ms + MAX_COMMAND_WINDOW_MS } else { cmd.deadline_ms };
        self.by_id.insert(cmd.id, deadline);
        self.save();
        Ok(())
    }

    /// A set that cannot be saved (full disk) does not stop the command: it
    /// is logged, and the id is still refused again until this agent restarts.
    fn save(&self) {
        let Some(path) = &self.saved_at else { return };
        let saved =
            path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| write_atomic(path, &self.encode()));
        if let Err(e) = saved {
            warn!(path = %path.display(), error = %e, "accepted-command ids not saved: a replay after a restart would not be recognised");
        }
    }
}

/// Why a desired document was not applied (reported to the controller).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("undecodable desired document: {0}")]
    Decode(#[from] codec::DecodeError),
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    #[error("generation {generation} is not newer than {current}, the one in force (replayed or stale)")]
    Stale { generation: u64, current: u64 },
    #[error("secret {path} of workload {workload}: {why}")]
    Secret { workload: String, path: String, why: String },
}

/// A received payload → the document inside a verified signature.
pub fn open_signed(trust: &mut Trust, device: &str, payload: &[u8]) -> Result<Desired, Refusal> {
    match codec::decode_on(TopicKind::Desired, payload)? {
        (_, Message::SignedDesired(signed)) => {
            let document = trust.verify(device, &signed)?;
            match codec::decode_on(TopicKind::Desired, document)? {
                (_, Message::Desired(d)) => Ok(d),
                (_, other) => Err(Refusal::Decode(codec::DecodeError::WrongKind {
                    expected: "desired",
                    got: other.kind().name(),
                })),
            }
        }
        _ => Err(Refusal::Crypto(CryptoError::Unsigned)),
    }
}

/// Opens a workload's sealed files (in memory), for the moment its container
/// is created; the result is written to tmpfs and dropped.
pub fn open_files(
    key: Option<&DeviceKey>,
    device: &str,
    workload: &str,
    files: &[baton_protocol::spec::File],
) -> Result<Vec<baton_protocol::spec::File>, Refusal> {
    files
        .iter()
        .map(|f| {
            if !f.is_sealed() {
                return Ok(f.clone());
            }
            let fail = |why: String| Refusal::Secret { workload: workload.to_owned(), path: f.path.clone(), why };
            let key = key.ok_or_else(|| fail("this device has no identity key".into()))?;
            let contents = key
                .unseal(&crypto::secret_context(device, workload, &f.path), &f.contents)
                .map_err(|e| fail(e.to_string()))?;
            Ok(baton_protocol::spec::File { path: f.path.clone(), mode: f.permissions(), contents })
        })
        .collect()
}

/// Checks that every sealed file of a document opens on this device, so a
/// document that could not run is refused on arrival rather than at start.
pub fn check_secrets(key: Option<&DeviceKey>, device: &str, d: &Desired) -> Result<(), Refusal> {
    for w in &d.workloads {
        open_files(key, device, &w.name, &w.container.files)?;
    }
    Ok(())
}

/// The document persisted on flash: the signed payload as received (verified
/// then; its secrets still sealed). Older agents persisted unsigned documents.
pub fn read_persisted(bytes: &[u8]) -> Result<Desired, Refusal> {
    let wrong = |other: Message| codec::DecodeError::WrongKind { expected: "desired", got: other.kind().name() };
    match codec::decode(bytes)? {
        (_, Message::SignedDesired(signed)) => match codec::decode(&signed.document)? {
            (_, Message::Desired(d)) => Ok(d),
            (_, other) => Err(wrong(other).into()),
        },
        (_, Message::Desired(d)) => Ok(d),
        (_, other) => Err(wrong(other).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::crypto::SigningKey;
    use baton_protocol::encode;
    use baton_protocol::spec::{ContainerSpec, File, WorkloadSpec};

    #[test]
    fn commands_need_a_trusted_signature_a_near_deadline_and_run_once() {
        use baton_protocol::CommandAction;
        let key = SigningKey::from_seed(&[5; 32]);
        let now = 1_000_000;
        let cmd = |id, deadline_ms, action| {
            key.sign_command(
                "pi-a",
                Command {
                    id,
                    deadline_ms,
                    action,
                    key: Vec::new(),
                    signature: Vec::new(),
                    issued_ms: 0,
                    time_signature: Vec::new(),
                },
            )
        };
        let exec = cmd(1, now + 90_000, CommandAction::Exec { workload: "w".into(), argv: vec!["id".into()] });
        assert_eq!(check_command(&[key.public()], "pi-a", &exec), Ok(None));
        assert!(check_command(&[], "pi-a", &exec).unwrap_err().contains("no controller key"));
        assert!(check_command(&[[9; 32]], "pi-a", &exec).unwrap_err().contains("untrusted key"));
        assert!(check_command(&[key.public()], "pi-b", &exec).unwrap_err().contains("bad signature"));
        // A 1.4 command carries the controller's time, signed.
        let timed =
            key.sign_command("pi-a", Command { issued_ms: now, ..cmd(5, now + 90_000, CommandAction::Diagnostics) });
        assert_eq!(check_command(&[key.public()], "pi-a", &timed), Ok(Some(now)));
        let moved = Command { issued_ms: now + 1, ..timed };
        assert!(check_command(&[key.public()], "pi-a", &moved).unwrap_err().contains("its time"));

        let mut seen = SeenCommands::default();
        assert_eq!(seen.admit(&exec, now), Ok(()));
        assert!(seen.admit(&exec, now + 1).unwrap_err().contains("replayed"));
        // Past its deadline it is forgotten (and the deadline check refuses it anyway).
        assert_eq!(seen.admit(&exec, now + 90_001), Ok(()));
    }

    #[test]
    fn accepted_commands_are_remembered_across_restarts_until_their_deadline() {
        use baton_protocol::CommandAction;
        let dir = tempfile::tempdir().unwrap();
        let path = seen_commands_path(dir.path());
        let now = 1_000_000;
        let cmd = |id, deadline_ms| Command {
            id,
            deadline_ms,
            action: CommandAction::Diagnostics,
            key: Vec::new(),
            signature: Vec::new(),
            issued_ms: 0,
            time_signature: Vec::new(),
        };
        let mut seen = SeenCommands::load(&path, now);
        seen.floor_ms = now;
        assert_eq!(seen.admit(&cmd(1, now + 1000), now), Ok(()));
        assert_eq!(seen.admit(&cmd(2, now + 5000), now), Ok(()));

        let mut restarted = SeenCommands::load(&path, now + 10);
        assert_eq!(restarted.floor_ms, now, "the controller time known was not kept");
        assert!(restarted.admit(&cmd(1, now + 1000), now + 10).unwrap_err().contains("replayed"));
        // A file of an agent before 1.4 (ids only) is still read.
        let old: Vec<u8> = [7u64, now + 1000].iter().flat_map(|v| v.to_le_bytes()).collect();
        let decoded = SeenCommands::decode(&old, now);
        assert_eq!((decoded.by_id.get(&7).copied(), decoded.floor_ms), (Some(now + 1000), 0));
        // Expired ids are dropped at load.
        let later = SeenCommands::load(&path, now + 2000);
        assert_eq!(later.by_id.keys().copied().collect::<Vec<_>>(), vec![2]);

        // A damaged file (a torn entry, garbage) never panics and keeps what is whole.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0xff; 7]);
        assert_eq!(SeenCommands::decode(&bytes, now).by_id.len(), 2);
        assert!(SeenCommands::decode(&[1, 2, 3], now).by_id.is_empty());
        std::fs::write(&path, [7u8; 160]).unwrap();
        let garbage = SeenCommands::load(&path, now);
        assert!(garbage.by_id.len() <= 1);
    }

    fn doc(generation: u64) -> Desired {
        Desired {
            generation,
            workloads: vec![WorkloadSpec {
                name: "db".into(),
                container: ContainerSpec {
                    files: vec![File { path: "/run/secrets/pw".into(), mode: 0o400, contents: b"ref".to_vec() }],
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn signed(key: &SigningKey, device: &str, d: &Desired) -> Vec<u8> {
        let inner = encode(&Message::Desired(d.clone())).unwrap();
        encode(&Message::SignedDesired(key.sign_desired(device, inner))).unwrap()
    }

    #[test]
    fn first_signer_is_pinned_and_others_are_refused_after() {
        let dir = tempfile::tempdir().unwrap();
        let ours = SigningKey::from_seed(&[1; 32]);
        let theirs = SigningKey::from_seed(&[2; 32]);
        let mut trust = Trust::load(Vec::new(), dir.path());
        assert_eq!(open_signed(&mut trust, "pi", &signed(&ours, "pi", &doc(1))).unwrap().generation, 1);
        assert!(std::fs::read_to_string(pinned_key_path(dir.path())).unwrap().contains(&crypto::hex(&ours.public())));
        assert!(matches!(
            open_signed(&mut trust, "pi", &signed(&theirs, "pi", &doc(2))),
            Err(Refusal::Crypto(CryptoError::UnknownKey(_)))
        ));
        // The pin survives a restart.
        let mut again = Trust::load(Vec::new(), dir.path());
        assert!(open_signed(&mut again, "pi", &signed(&theirs, "pi", &doc(2))).is_err());
        assert!(open_signed(&mut again, "pi", &signed(&ours, "pi", &doc(2))).is_ok());
        // Unsigned and signed-for-another-device documents.
        let plain = encode(&Message::Desired(doc(3))).unwrap();
        assert!(matches!(open_signed(&mut again, "pi", &plain), Err(Refusal::Crypto(CryptoError::Unsigned))));
        assert!(matches!(
            open_signed(&mut again, "pi", &signed(&ours, "other", &doc(3))),
            Err(Refusal::Crypto(CryptoError::BadSignature))
        ));
    }

    #[test]
    fn configured_keys_win_over_pinning() {
        let dir = tempfile::tempdir().unwrap();
        let ours = SigningKey::from_seed(&[1; 32]);
        let theirs = SigningKey::from_seed(&[2; 32]);
        let mut trust = Trust::load(vec![ours.public()], dir.path());
        assert!(open_signed(&mut trust, "pi", &signed(&theirs, "pi", &doc(1))).is_err());
        assert!(!pinned_key_path(dir.path()).exists());
        assert!(open_signed(&mut trust, "pi", &signed(&ours, "pi", &doc(1))).is_ok());
    }

    #[test]
    fn sealed_files_open_only_here_and_persisted_bytes_hold_no_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create_identity(dir.path()).unwrap();
        // Created once, owner-only, and stable.
        let meta = std::fs::metadata(identity_path(dir.path())).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);
        assert_eq!(load_or_create_identity(dir.path()).unwrap().public(), key.public());
        let ctx = crypto::secret_context("pi", "db", "/run/secrets/pw");
        let mut d = doc(1);
        let file = &mut d.workloads[0].container.files[0];
        file.mode |= File::SEALED;
        file.contents = crypto::seal(&key.public(), &ctx, b"hunter2").unwrap();
        let files = &d.workloads[0].container.files;
        let opened = open_files(Some(&key), "pi", "db", files).unwrap();
        assert_eq!((opened[0].contents.as_slice(), opened[0].mode), (&b"hunter2"[..], 0o400));
        check_secrets(Some(&key), "pi", &d).unwrap();
        // Sealed for another device id or workload, or no key at all.
        assert!(check_secrets(Some(&key), "pi-2", &d).is_err());
        assert!(open_files(Some(&key), "pi", "web", files).is_err());
        assert!(check_secrets(None, "pi", &d).is_err());
        // What is persisted stays sealed.
        let bytes = signed(&SigningKey::from_seed(&[1; 32]), "pi", &d);
        assert!(!bytes.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(read_persisted(&bytes).unwrap(), d);
    }
}
