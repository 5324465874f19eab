//! Where the engine gets images from: [`ImageSource`] (build a workload's
//! container spec and rootfs, ask for pulls, collect garbage) and the
//! device's implementation, [`StoreImages`]: the local store plus, when a
//! registry is configured, the pull thread. The simulator's is
//! `runtime::fake::FakeImages`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use baton_protocol::spec::{ContainerSpec, WorkloadSpec};
use tracing::warn;

use super::puller::Puller;
use super::registry::Registry;
use super::{ImageError, ImageStore};
use crate::reconcile::container_spec;
use crate::runtime::rootfs::Rootfs;
use crate::step::{digest_of, PullOutcome, PullRequest};

pub trait ImageSource {
    /// `w`'s container spec on this device (image config merged, user
    /// resolved) and its rootfs; `ImageError::NotFound` when its image is
    /// not in the store.
    fn build(&self, w: &WorkloadSpec) -> Result<(ContainerSpec, Rootfs), ImageError>;
    /// Whether a missing image can be pulled (else it must be loaded).
    fn can_pull(&self) -> bool;
    fn request_pull(&mut self, request: PullRequest);
    /// Pulls that ended since the last call.
    fn finished_pulls(&mut self) -> Vec<PullOutcome>;
    /// Removes images nobody `keep`s and no container stands on (`in_use`
    /// layer dirs) until the store is under `budget` bytes.
    fn gc(&mut self, keep: &BTreeSet<String>, in_use: &BTreeSet<PathBuf>, budget: u64);
}

/// The image store, and its pull thread when there is a registry.
pub struct StoreImages {
    store: Arc<ImageStore>,
    puller: Option<Puller>,
}

impl StoreImages {
    /// Without a registry, images must be loaded locally.
    pub fn new(store: ImageStore, registry: Option<Registry>) -> std::io::Result<Self> {
        let store = Arc::new(store);
        let puller = registry.map(|r| Puller::spawn(store.clone(), r)).transpose()?;
        Ok(Self { store, puller })
    }
}

impl ImageSource for StoreImages {
    fn build(&self, w: &WorkloadSpec) -> Result<(ContainerSpec, Rootfs), ImageError> {
        let image = self.store.resolve(&w.image, digest_of(w))?;
        let rootfs = self.store.rootfs(&image)?;
        let mut spec = container_spec(w, &image.config);
        // Who it runs as: the manifest's user (a name is the image's), else the image's USER.
        let named = match (&spec.user_name, &spec.user) {
            (Some(name), _) => Some((name.clone(), "user")),
            (None, None) => image.config.config.user.clone().filter(|u| !u.is_empty()).map(|u| (u, "the image's USER")),
            (None, Some(_)) => None,
        };
        if let Some((user, whose)) = named {
            let read = |f: &str| rootfs.lookup(f).and_then(|p| std::fs::read_to_string(p).ok());
            let u = super::user::resolve(&user, read("etc/passwd").as_deref(), read("etc/group").as_deref())
                .map_err(|e| ImageError::Invalid(format!("{whose} {user:?}: {e}")))?;
            spec.user = Some(baton_protocol::spec::User { uid: u.uid, gid: u.gid });
        }
        Ok((spec, rootfs))
    }

    fn can_pull(&self) -> bool {
        self.puller.is_some()
    }

    fn request_pull(&mut self, request: PullRequest) {
        if let Some(p) = &self.puller {
            p.request(request);
        }
    }

    fn finished_pulls(&mut self) -> Vec<PullOutcome> {
        self.puller.as_ref().map(Puller::finished).unwrap_or_default()
    }

    fn gc(&mut self, keep: &BTreeSet<String>, in_use: &BTreeSet<PathBuf>, budget: u64) {
        if let Err(e) = self.store.gc(keep, in_use, budget) {
            warn!(error = %e, "image GC failed");
        }
    }
}
