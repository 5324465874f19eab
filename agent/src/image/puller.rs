//! The image-pull thread: pulls (and unpacks) one image at a time off the
//! engine's thread, so a slow registry never stalls supervision. Owned by
//! [`Puller`], which stops it when dropped.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use super::registry::Registry;
use super::{ImageError, ImageRecord, ImageStore};
use crate::step::{PullOutcome, PullRequest};

/// How long a shutdown waits for a pull under way before leaving it to the
/// process's exit (a pull can take minutes; SIGTERM must not).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub struct Puller {
    /// None once shutting down: the thread ends when its queue closes.
    requests: Option<Sender<PullRequest>>,
    results: Receiver<PullOutcome>,
    /// Says the thread has ended (it drops its end).
    ended: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Puller {
    pub fn spawn(store: Arc<ImageStore>, registry: Registry) -> std::io::Result<Self> {
        let (requests, rx) = channel::<PullRequest>();
        let (tx, results) = channel();
        let (ended_tx, ended) = channel::<()>();
        let thread = std::thread::Builder::new().name("image-pull".into()).spawn(move || {
            let _ended = ended_tx;
            let platform = super::manifest::Platform::current();
            for PullRequest { image, digest } in rx {
                let pulled = pull(&store, &registry, &platform, &image, digest.as_deref());
                let no_space = matches!(pulled, Err(ImageError::NoSpace { .. }));
                let outcome = PullOutcome { image, result: pulled.map_err(|e| e.to_string()), no_space };
                if tx.send(outcome).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self { requests: Some(requests), results, ended, thread: Some(thread) })
    }

    pub fn request(&self, request: PullRequest) {
        if let Some(r) = &self.requests {
            let _ = r.send(request);
        }
    }

    pub fn finished(&self) -> Vec<PullOutcome> {
        self.results.try_iter().collect()
    }
}

/// Pulls `image` (pinned to `digest` when given), unpacks it, then records
/// it under the name workloads use: a recorded image is one that can run.
fn pull(
    store: &ImageStore,
    registry: &Registry,
    platform: &super::manifest::Platform,
    image: &str,
    digest: Option<&str>,
) -> Result<(), ImageError> {
    // A resolved digest pins the bytes; the reference names where to get them.
    let reference = match digest {
        Some(d) => format!("{}@{d}", image.split('@').next().unwrap_or(image)),
        None => image.to_string(),
    };
    let (record, stats) = registry.pull(store, &reference, platform)?;
    info!(%image, blobs = stats.blobs_fetched, bytes = stats.bytes_downloaded, "pulled");
    let record = ImageRecord { reference: image.to_string(), ..record };
    match store.rootfs(&record) {
        Ok(_) => store.record_image(&record),
        Err(e) => {
            if matches!(e, ImageError::NoSpace { .. }) {
                let blobs: Vec<_> =
                    record.layers.iter().chain(&record.config_digest).chain([&record.manifest]).cloned().collect();
                store.forget_unreferenced(&blobs);
            }
            Err(e)
        }
    }
}

impl Drop for Puller {
    /// Closes the queue and joins the thread — unless a pull is still under
    /// way after a short grace: then it is left to end with the process.
    fn drop(&mut self) {
        self.requests = None;
        let Some(thread) = self.thread.take() else { return };
        match self.ended.recv_timeout(SHUTDOWN_GRACE) {
            Err(RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
            }
            Ok(()) | Err(RecvTimeoutError::Timeout) => warn!("an image pull is under way; leaving it to the exit"),
        }
    }
}
