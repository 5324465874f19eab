//! The controller's keys, each a 32-byte seed in a hex file (mode 0600)
//! created on first start unless the operator supplies one:
//! - the Ed25519 **signing key**: every desired document is signed with it and
//!   agents apply only documents signed by a key they trust;
//! - the **secrets key**: secret values are encrypted with it in the store.
//!   Kept beside the store it only protects copies of the database (backups);
//!   supply it from elsewhere (`--secrets-key FILE`, e.g. a tmpfs filled from
//!   a vault at boot) to protect a stolen disk too.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use baton_protocol::crypto;

/// Reads the seed in `path`; with `create`, makes a new one if the file does not exist.
pub fn load_or_create(path: &Path, create: bool) -> anyhow::Result<[u8; 32]> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(crypto::parse_key(&text).with_context(|| format!("key file {}", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let seed = crypto::random_seed()?;
            write_private(path, format!("{}\n", crypto::hex(&seed)).as_bytes())
                .with_context(|| format!("cannot create key file {}", path.display()))?;
            tracing::info!(path = %path.display(), "created a new key");
            Ok(seed)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read key file {}", path.display())),
    }
}

/// Writes an owner-only file (keys, tokens) atomically: the temp file is
/// created 0600, so the bytes are never readable by others, even briefly.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A fresh credential: (id, secret, SHA-256 of the secret). The id is 16 hex
/// digits, the secret 64; only the hash is ever stored.
pub fn new_secret() -> Result<(String, String, Vec<u8>), crypto::CryptoError> {
    let id = crypto::hex(&crypto::random_seed()?[..8]);
    let secret = crypto::hex(&crypto::random_seed()?);
    let hash = sha256(secret.as_bytes());
    Ok((id, secret, hash))
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().to_vec()
}

pub struct Keys {
    pub signing: crypto::SigningKey,
    /// The signing key's seed: the TLS CA is made from it (`tls`).
    pub signing_seed: [u8; 32],
    pub secrets: [u8; 32],
    /// The key files this start made (none existed): a replica that a
    /// shared store then refuses for other keys removes them
    /// (`forget_created`), so its data dir is as the operator left it.
    pub created: Vec<PathBuf>,
}

impl Keys {
    /// The operator's files, else `signing.key` and `secrets.key` in the data dir.
    pub fn load(data_dir: &Path, signing: Option<&Path>, secrets: Option<&Path>) -> anyhow::Result<Self> {
        let mut created = Vec::new();
        let mut own = |name: &str| -> anyhow::Result<[u8; 32]> {
            let path = data_dir.join(name);
            let existed = path.exists();
            let seed = load_or_create(&path, true)?;
            if !existed {
                created.push(path);
            }
            Ok(seed)
        };
        let signing = match signing {
            Some(p) => load_or_create(p, false)?,
            None => own("signing.key")?,
        };
        let secrets = match secrets {
            Some(p) => load_or_create(p, false)?,
            None => own("secrets.key")?,
        };
        Ok(Self { signing: crypto::SigningKey::from_seed(&signing), signing_seed: signing, secrets, created })
    }

    /// Removes the key files this start made; returns their names for the
    /// error that says why.
    pub fn forget_created(created: &[PathBuf]) -> Vec<String> {
        created
            .iter()
            .filter(|path| std::fs::remove_file(path).is_ok())
            .map(|path| path.display().to_string())
            .collect()
    }

    /// For tests and tools: fixed keys.
    pub fn fixed(seed: u8) -> Self {
        Self {
            signing: crypto::SigningKey::from_seed(&[seed; 32]),
            signing_seed: [seed; 32],
            secrets: [seed.wrapping_add(1); 32],
            created: Vec::new(),
        }
    }

    /// `ed25519:HEX`, as agents are configured with it.
    pub fn signing_public(&self) -> String {
        format!("ed25519:{}", crypto::hex(&self.signing.public()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_owner_only_and_reread() {
        let dir = tempfile::tempdir().unwrap();
        let a = Keys::load(dir.path(), None, None).unwrap();
        let b = Keys::load(dir.path(), None, None).unwrap();
        assert_eq!(a.signing_public(), b.signing_public());
        assert_eq!(a.secrets, b.secrets);
        let mode = std::fs::metadata(dir.path().join("signing.key")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        // A file the operator names must exist: no silent new key.
        assert!(Keys::load(dir.path(), Some(&dir.path().join("missing")), None).is_err());
        std::fs::write(dir.path().join("bad"), "not a key").unwrap();
        assert!(Keys::load(dir.path(), None, Some(&dir.path().join("bad"))).is_err());
    }
}
