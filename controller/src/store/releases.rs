//! Agent builds published for self-update, and agent upgrades.

use super::{args, Store, StoreError};
use crate::upgrade::AgentRollout;

/// A published agent build (its bytes stay in the store).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct AgentRelease {
    pub version: String,
    pub arch: String,
    /// Versions numbered in publishing order (the same for every arch of one version).
    pub seq: u64,
    pub digest: Vec<u8>,
    pub size: u64,
    pub published_at: u64,
}

/// A publish that would replace a build's bytes under the same name.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("version {version} is published for {arch} already, with other bytes (a build is never replaced: give the new one a new version)")]
    Conflict { version: String, arch: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Stores a build; the same bytes again change nothing.
    pub fn add_release(
        &self,
        version: &str,
        arch: &str,
        digest: &[u8],
        data: &[u8],
        now: u64,
    ) -> Result<AgentRelease, PublishError> {
        let existing = self
            .db
            .query_opt("SELECT digest FROM agent_releases WHERE version = ?1 AND arch = ?2", args![version, arch])?;
        let existing = existing.map(|mut r| r.blob(0)).transpose()?;
        match existing {
            Some(d) if d == digest => {}
            Some(_) => return Err(PublishError::Conflict { version: version.into(), arch: arch.into() }),
            None => {
                let seq = self.db.query_opt(
                    "SELECT COALESCE((SELECT seq FROM agent_releases WHERE version = ?1 LIMIT 1),
                                     (SELECT COALESCE(MAX(seq), 0) + 1 FROM agent_releases))",
                    args![version],
                )?;
                let seq = seq.map(|mut r| r.int(0)).transpose()?.unwrap_or(1);
                self.db.execute(
                    "INSERT INTO agent_releases (version, arch, seq, digest, size, data, published_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    args![version, arch, seq, digest, data.len() as i64, data, now as i64],
                )?;
            }
        }
        Ok(self
            .releases()?
            .into_iter()
            .find(|r| r.version == version && r.arch == arch)
            .expect("the release was just stored"))
    }

    /// Deletes the builds of `version` (of one architecture, or all);
    /// returns how many went. The database reuses their pages for later writes.
    pub fn remove_release(&self, version: &str, arch: Option<&str>) -> Result<usize, StoreError> {
        self.db.execute(
            "DELETE FROM agent_releases WHERE version = ?1 AND (CAST(?2 AS TEXT) IS NULL OR arch = ?2)",
            args![version, arch],
        )
    }

    pub fn releases(&self) -> Result<Vec<AgentRelease>, StoreError> {
        let rows = self.db.query(
            "SELECT version, arch, seq, digest, size, published_at FROM agent_releases ORDER BY seq, arch",
            args![],
        )?;
        rows.into_iter()
            .map(|mut r| {
                Ok(AgentRelease {
                    version: r.text(0)?,
                    arch: r.text(1)?,
                    seq: r.int(2)? as u64,
                    digest: r.blob(3)?,
                    size: r.int(4)? as u64,
                    published_at: r.int(5)? as u64,
                })
            })
            .collect()
    }

    /// Up to `len` bytes of the build `digest` from `offset`, and its whole
    /// size; None when no build has that digest. Reads only those bytes
    /// (SQLite: through its blob handle; PostgreSQL: `substr` on the server).
    pub fn release_chunk(&self, digest: &[u8], offset: u64, len: usize) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(conn) = self.db.sqlite_conn() else {
            let row = self.db.query_opt(
                "SELECT length(data), substr(data, ?2, ?3) FROM agent_releases WHERE digest = ?1 LIMIT 1",
                args![digest, offset.saturating_add(1).min(i32::MAX as u64) as i64, len.min(i32::MAX as usize) as i64],
            )?;
            let Some(mut r) = row else { return Ok(None) };
            return Ok(Some((r.int(0)? as u64, r.blob(1)?)));
        };
        let row = self.db.query_opt("SELECT rowid FROM agent_releases WHERE digest = ?1 LIMIT 1", args![digest])?;
        let Some(mut row) = row else { return Ok(None) };
        let rowid = row.int(0)?;
        let mut blob = conn.blob_open(rusqlite::MAIN_DB, "agent_releases", "data", rowid, true)?;
        let total = blob.len() as u64;
        let mut data = vec![0; len.min(total.saturating_sub(offset) as usize)];
        if data.is_empty() {
            return Ok(Some((total, data)));
        }
        let read = blob.seek(SeekFrom::Start(offset)).and_then(|_| blob.read_exact(&mut data));
        read.map_err(|e| StoreError::Sql(format!("reading an agent build: {e}")))?;
        Ok(Some((total, data)))
    }

    pub fn save_agent_rollout(&self, r: &AgentRollout) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO agent_rollouts (id, doc) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
            args![r.id as i64, Self::json("agent upgrade", r)?],
        )?;
        Ok(())
    }

    /// The last agent upgrade, if any.
    pub fn load_agent_rollout(&self) -> Result<Option<AgentRollout>, StoreError> {
        let doc = self.db.query_opt("SELECT doc FROM agent_rollouts ORDER BY id DESC LIMIT 1", args![])?;
        let doc = doc.map(|mut r| r.text(0)).transpose()?;
        doc.map(|d| {
            serde_json::from_str(&d).map_err(|source| StoreError::Corrupt { id: "agent upgrade".into(), source })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_are_kept_once_numbered_by_version_and_read_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("baton.db")).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let a = store.add_release("1.0.0", "aarch64", &[1; 32], &data, 5).unwrap();
        let b = store.add_release("1.0.0", "arm", &[2; 32], &data[..10], 6).unwrap();
        let c = store.add_release("1.1.0", "arm", &[3; 32], &data[..10], 7).unwrap();
        assert_eq!((a.seq, b.seq, c.seq), (1, 1, 2));
        assert_eq!(store.add_release("1.0.0", "aarch64", &[1; 32], &data, 8).unwrap(), a, "the same bytes again");
        assert!(matches!(
            store.add_release("1.0.0", "aarch64", &[9; 32], b"other", 9),
            Err(PublishError::Conflict { .. })
        ));
        let (total, piece) = store.release_chunk(&[1; 32], 150_000, 65_536).unwrap().unwrap();
        assert_eq!((total, piece.as_slice()), (200_000, &data[150_000..]));
        assert_eq!(store.release_chunk(&[1; 32], 300_000, 10).unwrap().unwrap().1, b"");
        assert_eq!(store.release_chunk(&[7; 32], 0, 10).unwrap(), None);
    }
}
