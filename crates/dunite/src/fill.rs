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

type InFlight<K> = Arc<Mutex<HashMap<K, Arc<Fill>>>>;

/// The in-flight fills, by key.
#[derive(Debug)]
pub(crate) struct Fills<K> {
    inflight: InFlight<K>,
}

impl<K> Default for Fills<K> {
    fn default() -> Self {
        Self { inflight: Arc::default() }
    }
}

/// Takes a fill out of the map when its task ends, however it ends (a panic included), so
/// the next client of its key starts a new fill instead of joining a dead one.
struct Landed<K: Eq + Hash> {
    inflight: InFlight<K>,
    key: K,
    fill: Arc<Fill>,
}

impl<K: Eq + Hash> Drop for Landed<K> {
    fn drop(&mut self) {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if inflight.get(&self.key).is_some_and(|fill| Arc::ptr_eq(fill, &self.fill)) {
            inflight.remove(&self.key);
        }
        // A task that ended without an outcome (it panicked) fails its clients' streams.
        self.fill.state.send_if_modified(|state| match state {
            FillState::Connecting | FillState::Streaming { .. } => {
                *state =
                    FillState::Failed { status: None, message: "the fill ended without an outcome".into() };
                true
            }
            FillState::Done { .. } | FillState::Failed { .. } => false,
        });
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

impl<K: Eq + Hash + Clone + Send + 'static> Fills<K> {
    /// Join the fill of `key`, starting it with `start` if none is in flight. `start`
    /// receives the spool path and the state sender, and runs to completion on a task of its
    /// own (spawned, so a client going away does not cancel it for the others); when that
    /// task ends, however it ends, the fill leaves the map and then its spool is deleted.
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
        inflight.insert(key.clone(), Arc::clone(&fill));
        drop(inflight);
        let landed = Landed { inflight: Arc::clone(&self.inflight), key: key.clone(), fill };
        let task = start(path, state);
        tokio::spawn(async move {
            // Dropped in reverse order, on a panic too: the fill leaves the map, then `spool`
            // (a TempPath) deletes the file; open handles keep reading.
            let _spool = spool;
            let _landed = landed;
            task.await;
        });
        Ok(subscription)
    }
}

/// Copy an upstream body into the spool, publishing progress, then hand the spool to `store`
/// (which puts it in a cache and verifies it). Sets the final state. A body over `limit` bytes
/// (the cache's cap: it could never be stored) fails the fill as soon as that is known, from
/// its `Content-Length` or its bytes, so an upstream cannot fill the disk through a spool.
async fn run_fill<S, F, Fut>(
    spool: std::path::PathBuf,
    state: watch::Sender<FillState>,
    body: S,
    (total, content_type, limit): (Option<u64>, Option<Arc<str>>, u64),
    upstream_bytes: Arc<std::sync::atomic::AtomicU64>,
    store: F,
) where
    S: Stream<Item = Result<Bytes, String>> + Send,
    F: FnOnce(std::path::PathBuf, u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let result: Result<u64, String> = async {
        if let Some(total) = total
            && total > limit
        {
            return Err(format!("upstream announced {total} bytes, over the cache's cap of {limit}"));
        }
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
            if written + chunk.len() as u64 > limit {
                return Err(format!("upstream body exceeds the cache's cap of {limit} bytes"));
            }
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

/// Run a fill from an upstream's answer: a success is spooled (up to `limit` bytes) and handed
/// to the store step that `prepare` builds from the response (with the content type to show
/// clients); an error status or a failed request fails the fill with it.
pub(crate) async fn fill_from_upstream<E, P, F, Fut>(
    answer: Result<reqwest::Response, E>,
    (spool, state, limit): (std::path::PathBuf, watch::Sender<FillState>, u64),
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
            run_fill(spool, state, body, (total, content_type, limit), upstream_bytes, store).await;
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

    /// A fill whose task panics fails its clients and leaves the map: the next client of the
    /// key starts a new fill. Before, the map kept the dead fill (clients hung, new ones could
    /// not open its deleted spool).
    #[tokio::test]
    async fn a_panicking_fill_fails_its_clients_and_frees_its_key() {
        let spool_dir = tempfile::tempdir().unwrap();
        let fills: Fills<&'static str> = Fills::default();
        let first = fills
            .join(&"k", spool_dir.path(), |_, _| async {
                tokio::task::yield_now().await;
                panic!("a fill that panics (expected by this test)");
            })
            .unwrap();
        let (got, error) =
            tokio::time::timeout(std::time::Duration::from_secs(10), collect(first.into_stream()))
                .await
                .expect("the client of a dead fill must not hang");
        assert!(got.is_empty());
        assert!(error.is_some_and(|e| e.contains("without an outcome")));
        let (started, ran) =
            (Arc::new(std::sync::atomic::AtomicBool::new(false)), tokio::sync::oneshot::channel());
        let (flag, done) = (Arc::clone(&started), ran.0);
        let second = fills
            .join(&"k", spool_dir.path(), move |_, state| async move {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                state.send_replace(FillState::Done { written: 0 });
                let _ = done.send(());
            })
            .unwrap();
        ran.1.await.unwrap();
        assert!(started.load(std::sync::atomic::Ordering::SeqCst), "a new fill started");
        assert_eq!(collect(second.into_stream()).await, (Vec::new(), None));
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
