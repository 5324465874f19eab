//! Agent builds published for self-update, and agent upgrades.

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};
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
        let existing: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT digest FROM agent_releases WHERE version = ?1 AND arch = ?2",
                params![version, arch],
                |r| r.get(0),
            )
            .optional()
            .map_err(StoreError::from)?;
        match existing {
            Some(d) if d == digest => {}
            Some(_) => return Err(PublishError::Conflict { version: version.into(), arch: arch.into() }),
            None => {
                let seq: i64 = self
                    .conn
                    .query_row(
                        "SELECT COALESCE((SELECT seq FROM agent_releases WHERE version = ?1 LIMIT 1),
                                         (SELECT COALESCE(MAX(seq), 0) + 1 FROM agent_releases))",
                        [version],
                        |r| r.get(0),
                    )
                    .map_err(StoreError::from)?;
                self.conn
                    .execute(
                        "INSERT INTO agent_releases (version, arch, seq, digest, size, data, published_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![version, arch, seq, digest, data.len() as i64, data, now as i64],
                    )
                    .map_err(StoreError::from)?;
            }
        }
        Ok(self
            .releases()?
            .into_iter()
            .find(|r| r.version == version && r.arch == arch)
            .expect("the release was just stored"))
    }

    /// Deletes the builds of `version` (of one architecture, or all);
    /// returns how many went. SQLite reuses their pages for later writes.
    pub fn remove_release(&self, version: &str, arch: Option<&str>) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM agent_releases WHERE version = ?1 AND (?2 IS NULL OR arch = ?2)",
            params![version, arch],
        )?)
    }

    pub fn releases(&self) -> Result<Vec<AgentRelease>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT version, arch, seq, digest, size, published_at FROM agent_releases ORDER BY seq, arch",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(AgentRelease {
                version: r.get(0)?,
                arch: r.get(1)?,
                seq: r.get::<_, i64>(2)? as u64,
                digest: r.get(3)?,
                size: r.get::<_, i64>(4)? as u64,
                published_at: r.get::<_, i64>(5)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Up to `len` bytes of the build `digest` from `offset`, and its whole
    /// size; None when no build has that digest. Reads only those bytes.
    pub fn release_chunk(&self, digest: &[u8], offset: u64, len: usize) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        use std::io::{Read, Seek, SeekFrom};
        let row: Option<i64> = self
            .conn
            .query_row("SELECT rowid FROM agent_releases WHERE digest = ?1 LIMIT 1", [digest], |r| r.get(0))
            .optional()?;
        let Some(rowid) = row else { return Ok(None) };
        let mut blob = self.conn.blob_open(rusqlite::MAIN_DB, "agent_releases", "data", rowid, true)?;
        let total = blob.len() as u64;
        let mut data = vec![0; len.min(total.saturating_sub(offset) as usize)];
        if data.is_empty() {
            return Ok(Some((total, data)));
        }
        let read = blob.seek(SeekFrom::Start(offset)).and_then(|_| blob.read_exact(&mut data));
        read.map_err(|e| StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Some((total, data)))
    }

    pub fn save_agent_rollout(&self, r: &AgentRollout) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO agent_rollouts (id, doc) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
            params![r.id as i64, Self::json("agent upgrade", r)?],
        )?;
        Ok(())
    }

    /// The last agent upgrade, if any.
    pub fn load_agent_rollout(&self) -> Result<Option<AgentRollout>, StoreError> {
        let doc: Option<String> = self
            .conn
            .query_row("SELECT doc FROM agent_rollouts ORDER BY id DESC LIMIT 1", [], |r| r.get(0))
            .optional()?;
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
