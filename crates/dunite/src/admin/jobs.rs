//! Prefetch jobs: each runs on a task of its own (a client going away does not stop it) and
//! is kept, with its progress and outcome, for `GET /admin/prefetch/{id}`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::Error;
use super::api::PrefetchJob;
use crate::oci::{Mirror, Platform, PrefetchProgress};
use crate::spec::Reference;

/// Jobs kept at most, running or ended; the oldest ended ones make room for new ones.
const MAX_JOBS: usize = 64;

/// The prefetch jobs of one server.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
}

#[derive(Debug)]
struct Job {
    image: String,
    progress: PrefetchProgress,
    /// `None` while running; then the outcome.
    outcome: Mutex<Option<Result<(), String>>>,
}

impl Jobs {
    /// Start prefetching `host`'s `name` at `reference`; returns the job as it starts.
    pub(crate) fn start(
        &self,
        mirror: &Arc<Mirror>,
        image: String,
        (host, name, reference): (String, String, Reference),
        platform: Platform,
    ) -> Result<PrefetchJob, Error> {
        let job = Arc::new(Job { image, progress: PrefetchProgress::default(), outcome: Mutex::new(None) });
        let id = {
            let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            while jobs.len() >= MAX_JOBS {
                let ended = jobs.iter().find(|(_, job)| job.is_done()).map(|(id, _)| *id);
                match ended {
                    Some(id) => jobs.remove(&id),
                    None => return Err(Error::TooManyJobs(jobs.len())),
                };
            }
            let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
            jobs.insert(id, Arc::clone(&job));
            id
        };
        let (mirror, running) = (Arc::clone(mirror), Arc::clone(&job));
        tokio::spawn(async move {
            let result = mirror.prefetch((&host, &name), reference, &platform, &running.progress).await;
            let outcome = match result {
                Ok(()) => {
                    tracing::info!(image = running.image, "prefetch done");
                    Ok(())
                }
                Err(error) => {
                    let text = crate::error_chain(&error);
                    if error.is_client_error() {
                        tracing::info!(image = running.image, error = text, "prefetch failed");
                    } else {
                        tracing::warn!(image = running.image, error = text, "prefetch failed");
                    }
                    Err(text)
                }
            };
            *running.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        });
        Ok(job.view(id))
    }

    /// The job `id`, as it is now.
    pub(crate) fn get(&self, id: u64) -> Option<PrefetchJob> {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.get(&id).map(|job| job.view(id))
    }
}

impl Job {
    fn is_done(&self) -> bool {
        self.outcome.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    fn view(&self, id: u64) -> PrefetchJob {
        let outcome = self.outcome.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let (state, error) = match outcome {
            None => ("running", None),
            Some(Ok(())) => ("done", None),
            Some(Err(error)) => ("failed", Some(error)),
        };
        let p = &self.progress;
        let read = |n: &AtomicU64| n.load(Ordering::Relaxed);
        PrefetchJob {
            id,
            image: self.image.clone(),
            state: state.to_owned(),
            manifests: read(&p.manifests),
            blobs_total: read(&p.blobs_total),
            blobs_done: read(&p.blobs_done),
            blobs_cached: read(&p.blobs_cached),
            bytes_total: read(&p.bytes_total),
            bytes_done: read(&p.bytes_done),
            error,
        }
    }
}
