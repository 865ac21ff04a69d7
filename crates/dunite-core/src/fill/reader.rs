//! The reading half of a fill: a client's view of it, and its bytes as they arrive.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use super::{FillError, Landing, Source, State};
use crate::Stored;
use crate::entries::blocking;

/// Bytes a client reads from the spool at a time.
const READ_CHUNK: u64 = 256 * 1024;

/// One client's view of a fill, from [`Fills::join`](super::Fills::join).
pub struct Joined<H> {
    state: watch::Receiver<State<H>>,
    first: bool,
}

impl<H> std::fmt::Debug for Joined<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined").finish_non_exhaustive()
    }
}

/// The upstream's answer to a fill, as [`Joined::started`] reports it.
#[derive(Debug)]
pub struct Started<H> {
    head: Arc<H>,
    total: Option<u64>,
}

impl<H> Started<H> {
    /// What the fill learned from the upstream's answer.
    #[must_use]
    pub fn head(&self) -> &H {
        &self.head
    }

    /// The body's size, if the upstream announced it (or the fill already ended).
    #[must_use]
    pub fn total(&self) -> Option<u64> {
        self.total
    }
}

/// How a fill ended, as [`Joined::finished`] reports it.
#[derive(Debug)]
pub struct Finished {
    size: u64,
    landing: Option<Arc<Landing>>,
}

impl Finished {
    /// The verified body's size.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// What the cache committed, if the fill stored its bytes (for
    /// [`EntryStore::open_stored`](crate::EntryStore::open_stored)); `None` if they were
    /// served uncached ([`uncached`](Self::uncached) says why) or the fill resolved to an
    /// entry the cache held. The entry is pinned (kept from this process's evictor) while the
    /// fill's clients hold it.
    #[must_use]
    pub fn stored(&self) -> Option<&Stored> {
        self.landing.as_ref().and_then(|landing| landing.stored.as_ref())
    }

    /// Why the verified bytes were not stored (a database that could not record them, a
    /// local failure moving them into place); `None` if they were, or if the fill resolved to
    /// an entry the cache held.
    #[must_use]
    pub fn uncached(&self) -> Option<&FillError> {
        self.landing.as_ref().and_then(|landing| landing.uncached.as_ref())
    }
}

impl<H: Send + Sync + 'static> Joined<H> {
    pub(super) fn new(state: watch::Receiver<State<H>>, first: bool) -> Self {
        Self { state, first }
    }

    /// Whether this client started the fill (the others joined it).
    #[must_use]
    pub fn is_first(&self) -> bool {
        self.first
    }

    /// Wait for the upstream's answer: the head and size of the body to come, or the fill's
    /// error.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    ///
    /// # Errors
    ///
    /// The fill's [`FillError`].
    pub async fn started(&mut self) -> Result<Started<H>, FillError> {
        loop {
            let source = match &*self.state.borrow_and_update() {
                State::Connecting => None,
                State::Receiving { source, .. } => {
                    Some(Started { head: Arc::clone(&source.head), total: source.total })
                }
                State::Verified { source, written } | State::Landed { source, written, .. } => {
                    Some(Started { head: Arc::clone(&source.head), total: Some(*written) })
                }
                State::Failed(error) => return Err(error.clone()),
            };
            if let Some(started) = source {
                return Ok(started);
            }
            if self.state.changed().await.is_err() {
                return Err(FillError::Ended);
            }
        }
    }

    /// Wait for the fill to end: verified (and stored, unless the cache could not record it),
    /// or failed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    ///
    /// # Errors
    ///
    /// The fill's [`FillError`].
    pub async fn finished(&mut self) -> Result<Finished, FillError> {
        loop {
            let verified = match &*self.state.borrow_and_update() {
                State::Connecting | State::Receiving { .. } => None,
                State::Verified { written, .. } => Some(*written),
                State::Landed { written, landing, .. } => {
                    return Ok(Finished { size: *written, landing: Some(Arc::clone(landing)) });
                }
                State::Failed(error) => return Err(error.clone()),
            };
            if self.state.changed().await.is_err() {
                // The fill's task ended: verified bytes it could not store are served as
                // they are.
                return verified.map(|size| Finished { size, landing: None }).ok_or(FillError::Ended);
            }
        }
    }

    /// The bytes of the body from offset `start`, to `end` (exclusive; `None`: the end of the
    /// body), as they arrive.
    ///
    /// The last byte of the body is held back until the whole body is verified, so a client
    /// never receives a complete body of bytes that then fail verification: a failed fill
    /// ends the stream with an error instead. A range that ends before the last byte is
    /// served as soon as it has arrived (what lazy-pulling clients want), before the whole
    /// body is verified.
    ///
    /// Reads are positioned, on the blocking pool, from a handle shared by every client: a
    /// spool renamed into place meanwhile is still read to its end.
    pub fn body(
        self,
        start: u64,
        end: Option<u64>,
    ) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        futures_util::stream::unfold((self.state, start, false), move |(mut rx, pos, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let seen = match &*rx.borrow_and_update() {
                    State::Connecting => Ok((None, 0, false)),
                    State::Receiving { source, written } => {
                        Ok((Some(Arc::clone(source)), written.saturating_sub(1), false))
                    }
                    State::Verified { source, written } | State::Landed { source, written, .. } => {
                        Ok((Some(Arc::clone(source)), *written, true))
                    }
                    State::Failed(error) => Err(error.clone()),
                };
                let (source, available, complete) = match seen {
                    Ok(seen) => seen,
                    Err(error) => return Some((Err(std::io::Error::other(error)), (rx, pos, true))),
                };
                let limit = end.map_or(available, |end| end.min(available));
                if let Some(source) = source
                    && limit > pos
                {
                    let want = (limit - pos).min(READ_CHUNK);
                    return Some(match read_at(source, pos, want).await {
                        Ok(bytes) => {
                            let next = pos + bytes.len() as u64;
                            (Ok(bytes), (rx, next, false))
                        }
                        Err(e) => (Err(e), (rx, pos, true)),
                    });
                }
                if complete || end.is_some_and(|end| pos >= end) {
                    return None;
                }
                if rx.changed().await.is_err() {
                    let error = std::io::Error::other(FillError::Ended);
                    return Some((Err(error), (rx, pos, true)));
                }
            }
        })
    }
}

/// Read `len` bytes at `offset` of the fill's file.
async fn read_at<H: Send + Sync + 'static>(
    source: Arc<Source<H>>,
    offset: u64,
    len: u64,
) -> std::io::Result<Bytes> {
    blocking(move || {
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        std::os::unix::fs::FileExt::read_exact_at(&*source.file, &mut buf, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
}
