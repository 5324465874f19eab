//! Secrets: versions encrypted at rest, revisions pinned to a version,
//! files sealed to each device at publish.

use std::collections::BTreeMap;

use baton_protocol::crypto;
use baton_protocol::spec::{File, WorkloadSpec};

use crate::fleet::Millis;
use baton_protocol::token::SecretRef;

use crate::store::Store;
use crate::tenant::Scope;
use crate::view::SecretView;
use crate::workload::Validated;

use super::{lock, Controller, OpError, SealCache};

/// Binds a stored secret ciphertext to its name and version.
pub(super) fn secret_aad(name: &str, version: u64) -> Vec<u8> {
    format!("baton secret {name} v{version}").into_bytes()
}

impl Controller {
    /// Points every secret file of a spec at its secret's current version, so
    /// a new secret version is a new revision (and rolls out like one).
    pub(super) fn pin_secret_versions(
        versions: &BTreeMap<String, u64>,
        spec: &mut WorkloadSpec,
    ) -> Result<(), OpError> {
        for f in spec.container.files.iter_mut().filter(|f| f.is_sealed()) {
            let SecretRef { name, .. } = SecretRef::parse(&f.contents)
                .ok_or_else(|| OpError::Invalid(format!("{}: malformed secret reference", f.path)))?;
            let version = versions.get(&name).ok_or_else(|| {
                OpError::Invalid(format!(
                    "workload {}: secret {name} does not exist; create it with `baton secret create {name} --from-file FILE`",
                    spec.name
                ))
            })?;
            f.contents = SecretRef { name, version: *version }.to_bytes();
        }
        Ok(())
    }

    /// `baton secret create`: stores a new version (encrypted) and rolls every
    /// workload that uses the secret to a new revision.
    pub fn put_secret(&self, name: &str, value: &[u8], now: Millis, scope: &Scope) -> Result<SecretView, OpError> {
        baton_protocol::check_name(baton_protocol::NameKind::Secret, name)
            .map_err(|e| OpError::Invalid(e.to_string()))?;
        if value.len() > crate::workload::MAX_FILES_BYTES {
            return Err(OpError::Invalid(format!(
                "secret of {} bytes; secrets travel inside desired documents, keep them under {}",
                value.len(),
                crate::workload::MAX_FILES_BYTES
            )));
        }
        let tenant = scope.owner();
        let users: Vec<Validated> = {
            let st = lock(&self.state);
            let store = lock(&self.store);
            let latest = store.secret_latest(name)?;
            if let Some(other) = latest.as_ref().filter(|s| s.tenant != tenant) {
                return Err(OpError::Invalid(match scope {
                    Scope::All => {
                        format!("secret {name} belongs to tenant {0}: set it with --tenant {0}", other.tenant)
                    }
                    Scope::Tenant(_) => format!("secret name {name} is taken by another tenant"),
                }));
            }
            let version = latest.map_or(0, |s| s.version) + 1;
            let data = crypto::encrypt(&self.keys.secrets, &secret_aad(name, version), value)
                .map_err(|e| OpError::Invalid(e.to_string()))?;
            store.put_secret(tenant, name, version, &data, now)?;
            self.event(&store, tenant, "secret.set", name, format!("version {version} set"), now);
            st.workloads
                .values()
                .filter(|e| e.tenant == tenant && e.manifest.secrets.iter().any(|s| s.name == name))
                .map(|e| Validated { manifest: e.manifest.clone(), spec: e.latest_spec().clone() })
                .collect()
        };
        if !users.is_empty() {
            for r in self.apply_workloads(users, now, &Scope::Tenant(tenant.into()))? {
                tracing::info!(workload = %r.name, revision = r.revision, action = %r.action, secret = name, "secret changed");
            }
        }
        self.secrets(scope)?.into_iter().find(|s| s.name == name).ok_or_else(|| OpError::NotFound(name.into()))
    }

    /// Every secret `scope` sees: name, version, when set, and the workloads
    /// using it. Never values.
    pub fn secrets(&self, scope: &Scope) -> Result<Vec<SecretView>, OpError> {
        let st = lock(&self.state);
        let list = lock(&self.store).list_secrets()?;
        Ok(list
            .into_iter()
            .filter(|s| scope.sees(&s.tenant))
            .map(|s| SecretView {
                used_by: st
                    .workloads
                    .values()
                    .filter(|e| e.tenant == s.tenant && e.manifest.secrets.iter().any(|m| m.name == s.name))
                    .map(|e| e.manifest.name.clone())
                    .collect(),
                name: s.name,
                tenant: s.tenant,
                version: s.version,
                updated_at_ms: s.updated_at,
            })
            .collect())
    }

    /// Deletes a secret no workload uses.
    pub fn delete_secret(&self, name: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let secret = self
            .secrets(scope)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| OpError::NotFound(format!("secret {name} not found")))?;
        let users = secret.used_by;
        if !users.is_empty() {
            return Err(OpError::Invalid(format!(
                "secret {name} is used by {}; change or delete them first",
                users.join(", ")
            )));
        }
        let store = lock(&self.store);
        if !store.delete_secret(name)? {
            return Err(OpError::NotFound(format!("secret {name} not found")));
        }
        self.event(&store, &secret.tenant, "secret.deleted", name, "deleted".into(), now);
        Ok(())
    }

    /// Seals every secret file of `specs` to `device`'s key, reusing earlier
    /// seals. A workload whose secrets cannot be sealed (the device never
    /// reported a key, or the secret version is gone) is left out of the
    /// device's document, with a warning: it never runs without its secrets.
    pub(super) fn seal(
        &self,
        store: &Store,
        cache: &mut SealCache,
        used: &mut SealCache,
        device: &str,
        key: Option<&[u8; 32]>,
        specs: Vec<WorkloadSpec>,
    ) -> Vec<WorkloadSpec> {
        let mut out = Vec::with_capacity(specs.len());
        'spec: for mut spec in specs {
            for i in 0..spec.container.files.len() {
                let file = &spec.container.files[i];
                if !file.is_sealed() {
                    continue;
                }
                let at = (device.to_string(), spec.name.clone(), file.path.clone(), file.contents.clone());
                let Some(key) = key else {
                    tracing::warn!(%device, workload = %spec.name, "device reported no sealing key (agent too old?): workload with secrets not sent");
                    continue 'spec;
                };
                let contents = match cache.remove(&at).filter(|(k, _)| k == key) {
                    Some((_, c)) => c,
                    None => match self.seal_file(store, device, &spec.name, file, key) {
                        Ok(c) => c,
                        Err(why) => {
                            tracing::warn!(%device, workload = %spec.name, path = %file.path, %why, "cannot seal a secret: workload not sent");
                            continue 'spec;
                        }
                    },
                };
                used.insert(at, (*key, contents.clone()));
                spec.container.files[i].contents = contents;
            }
            out.push(spec);
        }
        out
    }

    pub(super) fn seal_file(
        &self,
        store: &Store,
        device: &str,
        workload: &str,
        file: &File,
        key: &[u8; 32],
    ) -> Result<Vec<u8>, String> {
        let SecretRef { name, version } =
            SecretRef::parse(&file.contents).ok_or_else(|| "malformed secret reference".to_string())?;
        let value = self.secret_value(store, &name, version)?;
        crypto::seal(key, &crypto::secret_context(device, workload, &file.path), &value).map_err(|e| e.to_string())
    }

    pub(super) fn secret_value(&self, store: &Store, name: &str, version: u64) -> Result<Vec<u8>, String> {
        let data = store
            .secret(name, version)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("secret {name} version {version} no longer exists"))?;
        crypto::decrypt(&self.keys.secrets, &secret_aad(name, version), &data)
            .map_err(|_| format!("secret {name} version {version} does not decrypt with this controller's secrets key"))
    }
}
