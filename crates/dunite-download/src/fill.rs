//! A download's fill, on the core's [`Fills`](dunite_core::Fills): fetch (revalidating a stale
//! entry), stream to every client, verify against the pin, and commit by rename.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use tokio::io::AsyncReadExt as _;

use dunite_core::{ContentDigest, Expected, FillError, Filling, Joined};

use crate::Lookup;
use crate::cache::{DownloadInfo, Inner, Meta, bump};
use crate::{
    Body, DownloadCache, DownloadRequest, Error, FetchRequest, Fetched, Fetcher, Result, Source, UrlKey,
    Validators,
};

/// Bytes read from a fetcher's body at a time.
const READ_CHUNK: usize = 64 * 1024;

/// What a download's fill tells its clients before the bytes: where they come from and the
/// response's headers.
#[derive(Debug, Clone)]
pub struct DownloadHead {
    source: Source,
    content_type: Option<String>,
    validators: Validators,
    sha256: Option<ContentDigest>,
}

impl DownloadHead {
    /// A new body from upstream, or a cached entry (confirmed by a revalidation, or found
    /// fresh when the fill began).
    #[must_use]
    pub fn source(&self) -> Source {
        self.source
    }

    /// The `Content-Type`, if known.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The `ETag` and `Last-Modified`.
    #[must_use]
    pub fn validators(&self) -> &Validators {
        &self.validators
    }

    /// The content's SHA-256 when known before the bytes (a cached entry); a new body's is
    /// known once it is verified.
    #[must_use]
    pub fn sha256(&self) -> Option<&ContentDigest> {
        self.sha256.as_ref()
    }

    fn cached(info: &DownloadInfo, source: Source) -> Self {
        Self {
            source,
            content_type: info.content_type().map(str::to_owned),
            validators: info.validators().clone(),
            sha256: Some(info.sha256().clone()),
        }
    }
}

impl DownloadCache {
    /// Join the fill of `request` (its URL and pin), or start it with `fetcher`: the miss path
    /// of a download proxy, streamed. Look the request up first ([`lookup`](Self::lookup))
    /// and pass what it found as `seen`: the fill starts from it (revalidating the entry it
    /// found, or fetching when there was none) instead of reading the metadata again.
    ///
    /// The fill revalidates a stale entry that satisfies the request (a "not modified" answer
    /// resolves the fill to the cached entry, nothing is transferred) and otherwise fetches
    /// the URL: the body is spooled in the cache's directory, streamed to every client as it
    /// arrives, checked against the request's pin and the announced length (the last byte
    /// held until it is), and renamed into place as the URL's entry. A request with another
    /// pin is another fill: each client's bytes are verified against its own pin, whatever
    /// the cache holds meanwhile. See [`dunite_core::Fills`] for what [`Joined`] offers.
    ///
    /// Requires a Tokio runtime: the fill runs on a task of its own, so it completes (and
    /// caches its result) for the others even if the client that started it goes away.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use dunite_core::EvictionPolicy;
    /// use dunite_download::{DownloadCache, DownloadRequest, FetchError, Fetched, ResponseMeta, fetch_fn};
    /// use futures_util::StreamExt as _;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let options = DownloadCache::options(dir.path(), EvictionPolicy::new(1 << 20));
    /// let cache = DownloadCache::new(options, std::time::Duration::from_secs(60)).await?;
    /// let fetcher = fetch_fn(|_| async {
    ///     let meta = ResponseMeta::new().with_content_type("text/plain").with_content_length(5);
    ///     Ok::<_, FetchError>(Fetched::body(std::io::Cursor::new(b"hello".to_vec()), meta))
    /// });
    /// let request = DownloadRequest::new("https://example.com/greeting".parse()?);
    /// let seen = cache.lookup(&request).await?;
    /// let mut joined = cache.fill(&request, &seen, &fetcher)?;
    /// let started = joined.started().await?;
    /// assert_eq!(started.head().content_type(), Some("text/plain"));
    /// let body: Vec<u8> = joined.body(0, None).map(|chunk| chunk.unwrap().to_vec()).concat().await;
    /// assert_eq!(body, b"hello");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::UnsupportedDigest`] for a pin that is not SHA-256, [`Error::Cache`] outside a
    /// Tokio runtime. The fill's own failures reach its clients through [`Joined`]; turn them
    /// into this crate's errors with [`Error::from_fill`].
    pub fn fill<F>(
        &self,
        request: &DownloadRequest,
        seen: &Lookup,
        fetcher: &F,
    ) -> Result<Joined<DownloadHead>>
    where
        F: Fetcher + Clone + 'static,
    {
        if let Some(digest) = request.sha256()
            && digest.algorithm() != dunite_core::DigestAlgorithm::Sha256
        {
            return Err(Error::UnsupportedDigest { algorithm: digest.algorithm().name() });
        }
        let key =
            format!("{}|{}", request.sha256().map(ContentDigest::hex).unwrap_or_default(), request.url());
        let expected =
            request.sha256().map_or_else(Expected::new, |pin| Expected::new().with_digest(pin.clone()));
        // What the caller's look-up found, so the fill does not read the metadata again (a
        // round trip to a database that may be far away): nothing, or an entry to revalidate.
        let seen = match seen {
            Lookup::Missing => Seen::Nothing,
            Lookup::Cached(info) => Seen::Entry((**info).clone()),
            Lookup::Fresh(_) => Seen::Unknown,
        };
        let (inner, request, fetcher) = (Arc::clone(&self.inner), request.clone(), fetcher.clone());
        let joined = self.inner.fills.join(key, expected, move |filling| async move {
            let result = run(&inner, &request, seen, &fetcher, filling).await;
            if let Err(error) = &result {
                bump(&inner.counters.failed);
                tracing::debug!(url = request.url().redacted(), %error, "fetch-through failed");
            }
            result
        })?;
        if !joined.is_first() {
            bump(&self.inner.counters.coalesced);
        }
        Ok(joined)
    }
}

/// What the caller's look-up found before it asked for a fill.
enum Seen {
    /// No entry.
    Nothing,
    /// An entry that is stale, or does not satisfy the request (another pin).
    Entry(DownloadInfo),
    /// Not looked (or found fresh): the fill looks itself.
    Unknown,
}

/// The task of one fill.
async fn run<F: Fetcher>(
    inner: &Inner,
    request: &DownloadRequest,
    seen: Seen,
    fetcher: &F,
    filling: Filling<DownloadHead>,
) -> std::result::Result<(), FillError> {
    let url = request.url();
    let key = url.as_str();
    // Kept from eviction while it is being revalidated or replaced.
    let _pin = inner.cache.pin(key);
    // A stale entry of the content asked for is revalidated; anything else is fetched whole.
    let mut stale = match seen {
        Seen::Nothing => None,
        Seen::Entry(info) => Some(info).filter(|info| info.satisfies(request)),
        Seen::Unknown => match inner.cache.open_entry(key).await.map_err(other)? {
            Some(entry) => match DownloadInfo::from_entry(&entry.info).filter(|info| info.satisfies(request))
            {
                Some(info) if !info.is_stale(inner.freshness) => {
                    bump(&inner.counters.hits);
                    filling.serve_existing(DownloadHead::cached(&info, Source::Hit), entry).await;
                    return Ok(());
                }
                info => info,
            },
            None => None,
        },
    };
    loop {
        let validators = stale.as_ref().map(|info| info.validators().clone()).filter(|v| !v.is_empty());
        bump(&inner.counters.fetches);
        let conditional = validators.is_some();
        if conditional {
            bump(&inner.counters.conditional);
        }
        let answer = fetcher
            .fetch(FetchRequest::new(url.clone(), validators))
            .await
            .map_err(|e| FillError::other(Error::fetch(url, e)))?;
        match answer {
            Fetched::Body { body, meta } => {
                let mut record = Meta::new(request.sha256(), meta.content_type(), meta.validators());
                // Fail on an unencodable record before any byte is spooled; the digest is
                // filled in once the bytes are verified, in the store's own commit.
                record.to_json().map_err(other)?;
                let head = DownloadHead {
                    source: Source::Fetched,
                    content_type: meta.content_type().map(str::to_owned),
                    validators: meta.validators().clone(),
                    sha256: None,
                };
                let total = meta.content_length();
                return filling
                    .fill(key, (head, total), read_body(body), move |digest| {
                        record.sha256 = Some(digest.hex());
                        record.to_json().unwrap_or_default()
                    })
                    .await;
            }
            Fetched::NotModified { meta } => {
                let Some(info) = stale.take().filter(|_| conditional) else {
                    return Err(FillError::other(Error::UnexpectedNotModified { url: url.redacted() }));
                };
                let validators = if meta.validators().is_empty() {
                    info.validators().clone()
                } else {
                    meta.validators().clone()
                };
                let record = Meta::new(Some(info.sha256()), info.content_type(), &validators);
                let refreshed =
                    inner.cache.refresh(key, info.meta(), &record.to_json().map_err(other)?).await;
                if refreshed.map_err(other)? {
                    bump(&inner.counters.not_modified);
                    if let Some(entry) = inner.cache.open_entry(key).await.map_err(other)?
                        && let Some(info) = DownloadInfo::from_entry(&entry.info)
                        && info.satisfies(request)
                    {
                        filling.serve_existing(DownloadHead::cached(&info, Source::Revalidated), entry).await;
                        return Ok(());
                    }
                }
                // Removed or replaced since we looked: fetch the content whole (`stale` is
                // now None).
            }
        }
    }
}

/// A download error as a fill failure: the cache's own as [`FillError::Local`], any other
/// carried to every client as it is.
fn other(error: impl Into<Error>) -> FillError {
    match error.into() {
        // The cache's own failure (its database, its disk): local, as the core types it.
        Error::Cache(error) => FillError::Local(Arc::new(error)),
        error => FillError::other(error),
    }
}

/// A fetcher's body as a stream of chunks.
fn read_body(body: Body) -> impl Stream<Item = std::result::Result<Bytes, std::io::Error>> + Send {
    futures_util::stream::unfold(Some(body), |body| async move {
        let mut body = body?;
        let mut buf = vec![0u8; READ_CHUNK];
        match body.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(body)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

impl Error {
    /// The download error a failed fill of `url` amounts to: the fill's own download error
    /// (a fetcher's failure, say) as it was, bad content and local failures as
    /// [`Error::Cache`], a body that failed mid-stream as
    /// [`Source`](dunite_core::Error::Source), a fill that ended without an outcome as
    /// [`Error::FetchAborted`].
    #[must_use]
    pub fn from_fill(url: &UrlKey, error: FillError) -> Self {
        match error {
            FillError::Other(source) => match source.downcast_ref::<Self>() {
                Some(error) => error.clone(),
                None => Self::Fetch { url: url.redacted(), source },
            },
            FillError::Invalid(error) | FillError::Local(error) => Self::Cache((*error).clone()),
            FillError::Upstream { received, source } => match source.downcast_ref::<std::io::Error>() {
                Some(io) => Self::Cache(dunite_core::Error::Source {
                    received,
                    source: Arc::new(std::io::Error::new(io.kind(), io.to_string())),
                }),
                None => Self::Fetch { url: url.redacted(), source },
            },
            FillError::Ended => Self::FetchAborted { url: url.redacted() },
            other => Self::Fetch { url: url.redacted(), source: Arc::new(other) },
        }
    }
}
