//! Single-flight upstream fills, streamed to every client while they run.
//!
//! A miss starts one [`Fill`] per key (a blob's digest, a download's URL) however many
//! clients ask. The fill writes the
//! upstream body to a spool file and publishes how many bytes are there; each client reads
//! the spool from its own handle as it grows, so it receives bytes as they arrive. At the
//! end the fill stores the spool into its cache, which verifies it (size and digest, or the
//! download's pin); only then do clients get the last byte and the end of their stream. A cut upstream or a digest mismatch ends every
//! client's stream with an error (the connection is aborted), never with wrong bytes
//! presented as complete, and nothing enters the cache.

use std::collections::HashMap;
use std::hash::Hash;
use std::io::SeekFrom;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

/// Bytes a client reads from the spool at a time.
const CHUNK: usize = 64 * 1024;

/// Where a fill is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FillState {
    /// Waiting for the upstream's answer.
    Connecting,
    /// Receiving: `written` bytes are in the spool, of `total` if the upstream said.
    Streaming {
        /// Bytes in the spool.
        written: u64,
        /// The upstream's Content-Length.
        total: Option<u64>,
        /// The upstream's Content-Type, if it matters to clients (downloads).
        content_type: Option<Arc<str>>,
    },
    /// Stored and verified; `written` bytes in all.
    Done {
        /// The blob's size.
        written: u64,
    },
    /// Failed; nothing was cached.
    Failed {
        /// The upstream's status when it refused (404 and such), else `None`.
        status: Option<u16>,
        /// What happened.
        message: String,
    },
}

/// The in-flight fills, by key.
#[derive(Debug)]
pub(crate) struct Fills<K> {
    inflight: Mutex<HashMap<K, Arc<Fill>>>,
}

impl<K> Default for Fills<K> {
    fn default() -> Self {
        Self { inflight: Mutex::new(HashMap::new()) }
    }
}

/// One in-flight fill.
#[derive(Debug)]
pub(crate) struct Fill {
    spool: std::path::PathBuf,
    state: watch::Sender<FillState>,
}

/// A client's view of a fill: the current state and a handle on the spool.
#[derive(Debug)]
pub(crate) struct Subscription {
    /// State updates.
    pub(crate) state: watch::Receiver<FillState>,
    spool: std::fs::File,
}

impl<K: Eq + Hash + Clone> Fills<K> {
    /// Join the fill of `key`, starting it with `start` if none is in flight. `start`
    /// receives the spool path and the state sender, and must run to completion on its own
    /// task (it is spawned, so a client going away does not cancel it for the others).
    ///
    /// # Errors
    ///
    /// If the spool file cannot be created or opened.
    pub(crate) fn join<F, Fut>(
        &self,
        key: &K,
        spool_dir: &std::path::Path,
        start: F,
    ) -> std::io::Result<Subscription>
    where
        F: FnOnce(std::path::PathBuf, watch::Sender<FillState>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fill) = inflight.get(key) {
            // The spool exists while the fill is in the map: it is removed from the map
            // before its spool is deleted, under this lock.
            return Ok(Subscription {
                state: fill.state.subscribe(),
                spool: std::fs::File::open(&fill.spool)?,
            });
        }
        let spool = tempfile::Builder::new().prefix("fill-").tempfile_in(spool_dir)?.into_temp_path();
        let path = spool.to_path_buf();
        let (state, rx) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill { spool: path.clone(), state: state.clone() });
        let subscription = Subscription { state: rx, spool: std::fs::File::open(&path)? };
        inflight.insert(key.clone(), fill);
        drop(inflight);
        let task = start(path, state);
        tokio::spawn(async move {
            task.await;
            // `spool` (a TempPath) is dropped with this task, after the fill has left the
            // map (see `finish`), deleting the file; open handles keep reading.
            drop(spool);
        });
        Ok(subscription)
    }

    /// Remove `key`'s fill from the map (before its spool is deleted).
    pub(crate) fn finish(&self, key: &K) {
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
    }
}

/// Copy an upstream body into the spool, publishing progress, then hand the spool to `store`
/// (which puts it in a cache and verifies it). Sets the final state.
async fn run_fill<S, F, Fut>(
    spool: std::path::PathBuf,
    state: watch::Sender<FillState>,
    body: S,
    (total, content_type): (Option<u64>, Option<Arc<str>>),
    upstream_bytes: Arc<std::sync::atomic::AtomicU64>,
    store: F,
) where
    S: Stream<Item = Result<Bytes, String>> + Send,
    F: FnOnce(std::path::PathBuf, u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let result: Result<u64, String> = async {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&spool)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let mut written = 0u64;
        state.send_replace(FillState::Streaming { written, total, content_type: content_type.clone() });
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("upstream body failed after {written} bytes: {e}"))?;
            file.write_all(&chunk).await.map_err(|e| crate::error_chain(&e))?;
            // tokio's `write_all` returns once the write is queued on a blocking thread;
            // `flush` waits for it, so the bytes published below are readable by clients.
            file.flush().await.map_err(|e| crate::error_chain(&e))?;
            written += chunk.len() as u64;
            upstream_bytes.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            state.send_replace(FillState::Streaming { written, total, content_type: content_type.clone() });
        }
        if let Some(total) = total
            && total != written
        {
            return Err(format!("upstream sent {written} of {total} bytes"));
        }
        store(spool.clone(), written).await?;
        Ok(written)
    }
    .await;
    match result {
        Ok(written) => {
            state.send_replace(FillState::Done { written });
        }
        Err(message) => {
            tracing::warn!(%message, "fill failed; nothing cached");
            state.send_replace(FillState::Failed { status: None, message });
        }
    }
}

/// Run a fill from an upstream's answer: a success is spooled and handed to the store step
/// that `prepare` builds from the response (with the content type to show clients); an error
/// status or a failed request fails the fill with it.
pub(crate) async fn fill_from_upstream<E, P, F, Fut>(
    answer: Result<reqwest::Response, E>,
    spool: std::path::PathBuf,
    state: watch::Sender<FillState>,
    upstream_bytes: Arc<std::sync::atomic::AtomicU64>,
    prepare: P,
) where
    E: std::fmt::Display,
    P: FnOnce(&reqwest::Response) -> (Option<Arc<str>>, F),
    F: FnOnce(std::path::PathBuf, u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    match answer {
        Ok(response) if response.status().is_success() => {
            let total = response.content_length();
            let (content_type, store) = prepare(&response);
            let body = response
                .bytes_stream()
                .map(|chunk| chunk.map_err(|e| crate::upstream::redact(e).to_string()));
            run_fill(spool, state, body, (total, content_type), upstream_bytes, store).await;
        }
        Ok(response) => {
            let status = response.status();
            state.send_replace(FillState::Failed {
                status: Some(status.as_u16()),
                message: format!("upstream answered {status}"),
            });
        }
        Err(e) => {
            state.send_replace(FillState::Failed { status: None, message: e.to_string() });
        }
    }
}

impl Subscription {
    /// Wait until the fill has an answer from upstream (streaming, done or failed).
    pub(crate) async fn started(&mut self) -> FillState {
        loop {
            let state = self.state.borrow_and_update().clone();
            if state != FillState::Connecting {
                return state;
            }
            if self.state.changed().await.is_err() {
                return self.state.borrow().clone();
            }
        }
    }

    /// The blob's bytes as they arrive; ends with an error if the fill fails.
    pub(crate) fn into_stream(self) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let file = tokio::fs::File::from_std(self.spool);
        futures_util::stream::unfold(
            (file, self.state, 0u64, false),
            |(mut file, mut rx, pos, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    let state = rx.borrow_and_update().clone();
                    let (available, finished) = match &state {
                        FillState::Connecting => (0, false),
                        // The last byte is held back until the fill is verified: a client
                        // never receives a complete body (its Content-Length) of bytes that
                        // then fail verification.
                        FillState::Streaming { written, .. } => (written.saturating_sub(1), false),
                        FillState::Done { written } => (*written, true),
                        FillState::Failed { message, .. } => {
                            let error = std::io::Error::other(message.clone());
                            return Some((Err(error), (file, rx, pos, true)));
                        }
                    };
                    if available > pos {
                        let want = usize::try_from(available - pos).unwrap_or(CHUNK).min(CHUNK);
                        let mut buf = vec![0u8; want];
                        let read = async {
                            file.seek(SeekFrom::Start(pos)).await?;
                            file.read_exact(&mut buf).await
                        }
                        .await;
                        return Some(match read {
                            Ok(_) => (Ok(Bytes::from(buf)), (file, rx, pos + want as u64, false)),
                            Err(e) => (Err(e), (file, rx, pos, true)),
                        });
                    }
                    if finished {
                        return None;
                    }
                    if rx.changed().await.is_err() {
                        let error = std::io::Error::other("blob fill ended without an outcome");
                        return Some((Err(error), (file, rx, pos, true)));
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use futures_util::StreamExt as _;

    use super::*;

    /// A subscription on a spool holding `bytes`, with its state driven by hand.
    fn subscription(bytes: &[u8]) -> (watch::Sender<FillState>, Subscription, tempfile::NamedTempFile) {
        let mut spool = tempfile::NamedTempFile::new().unwrap();
        spool.write_all(bytes).unwrap();
        spool.flush().unwrap();
        let (state, rx) = watch::channel(FillState::Connecting);
        let file = std::fs::File::open(spool.path()).unwrap();
        (state, Subscription { state: rx, spool: file }, spool)
    }

    async fn collect(stream: impl Stream<Item = std::io::Result<Bytes>>) -> (Vec<u8>, Option<String>) {
        let mut stream = std::pin::pin!(stream);
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => got.extend_from_slice(&bytes),
                Err(e) => return (got, Some(e.to_string())),
            }
        }
        (got, None)
    }

    #[tokio::test]
    async fn the_last_byte_waits_for_verification() {
        let (state, sub, _spool) = subscription(b"0123456789");
        state.send_replace(FillState::Streaming { written: 10, total: Some(10), content_type: None });
        let reader = tokio::spawn(collect(sub.into_stream()));
        // Everything but the last byte may flow while the fill is unverified; then verify.
        tokio::task::yield_now().await;
        state.send_replace(FillState::Done { written: 10 });
        let (got, error) = reader.await.unwrap();
        assert_eq!(got, b"0123456789");
        assert_eq!(error, None);
    }

    #[tokio::test]
    async fn a_failed_verification_never_yields_a_complete_body() {
        let (state, sub, _spool) = subscription(b"0123456789");
        state.send_replace(FillState::Streaming { written: 10, total: Some(10), content_type: None });
        let reader = tokio::spawn(collect(sub.into_stream()));
        tokio::task::yield_now().await;
        state.send_replace(FillState::Failed { status: None, message: "digest mismatch".into() });
        let (got, error) = reader.await.unwrap();
        assert!(got.len() < 10, "a client must never receive the whole body of a failed fill: {got:?}");
        assert_eq!(error.as_deref(), Some("digest mismatch"));
    }
}
