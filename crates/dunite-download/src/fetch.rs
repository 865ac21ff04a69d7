//! The `Fetcher` trait: how the cache gets bytes from upstream, without an HTTP client of its
//! own.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::AsyncRead;

use crate::UrlKey;

/// A fetcher's error: anything that can be sent between threads.
pub type FetchError = Box<dyn std::error::Error + Send + Sync>;

/// The validators of a cached response, for a conditional request (`If-None-Match`,
/// `If-Modified-Since`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Validators {
    /// No validators.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// With the response's `ETag` (sent back as `If-None-Match`).
    #[must_use]
    pub fn with_etag(mut self, etag: impl Into<String>) -> Self {
        self.etag = Some(etag.into());
        self
    }

    /// With the response's `Last-Modified` (sent back as `If-Modified-Since`).
    #[must_use]
    pub fn with_last_modified(mut self, last_modified: impl Into<String>) -> Self {
        self.last_modified = Some(last_modified.into());
        self
    }

    /// The `ETag`, if the response had one.
    #[must_use]
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// The `Last-Modified` date, if the response had one.
    #[must_use]
    pub fn last_modified(&self) -> Option<&str> {
        self.last_modified.as_deref()
    }

    /// Whether there is nothing to validate with.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none()
    }
}

/// What the cache asks a [`Fetcher`] for: a URL and, when revalidating a cached entry, its
/// validators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    url: UrlKey,
    validators: Option<Validators>,
}

impl FetchRequest {
    pub(crate) fn new(url: UrlKey, validators: Option<Validators>) -> Self {
        Self { url, validators }
    }

    /// The URL to fetch.
    #[must_use]
    pub fn url(&self) -> &UrlKey {
        &self.url
    }

    /// The cached entry's validators, when this is a revalidation. With validators the
    /// fetcher should make a conditional request and may answer [`Fetched::NotModified`];
    /// without, it must answer with a body.
    #[must_use]
    pub fn validators(&self) -> Option<&Validators> {
        self.validators.as_ref()
    }
}

/// Response metadata a [`Fetcher`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseMeta {
    content_type: Option<String>,
    validators: Validators,
    content_length: Option<u64>,
}

impl ResponseMeta {
    /// Nothing known.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The `Content-Type`.
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// The `ETag`.
    #[must_use]
    pub fn with_etag(mut self, etag: impl Into<String>) -> Self {
        self.validators = self.validators.with_etag(etag);
        self
    }

    /// The `Last-Modified` date.
    #[must_use]
    pub fn with_last_modified(mut self, last_modified: impl Into<String>) -> Self {
        self.validators = self.validators.with_last_modified(last_modified);
        self
    }

    /// The `Content-Length`: the body must be exactly this long, or the store fails with
    /// [`Truncated`](dunite_core::Error::Truncated) or [`TooLong`](dunite_core::Error::TooLong)
    /// (and one over the cache's cap is refused before a byte is read).
    #[must_use]
    pub fn with_content_length(mut self, bytes: u64) -> Self {
        self.content_length = Some(bytes);
        self
    }

    /// The `Content-Type`, if given.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The `ETag` and `Last-Modified`, as given.
    #[must_use]
    pub fn validators(&self) -> &Validators {
        &self.validators
    }

    /// The `Content-Length`, if given.
    #[must_use]
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }
}

/// A body stream of a [`Fetched::Body`] answer.
pub type Body = Box<dyn AsyncRead + Send + Unpin>;

/// A [`Fetcher`]'s answer.
#[non_exhaustive]
pub enum Fetched {
    /// The content: a byte stream and the response's metadata. The cache streams it to disk
    /// (memory stays bounded) and verifies it as it goes.
    Body {
        /// The content.
        body: Body,
        /// The response's metadata.
        meta: ResponseMeta,
    },
    /// The cached entry is still current (an HTTP 304): only valid when the request carried
    /// [validators](FetchRequest::validators). Validators given here replace the recorded
    /// ones; the content type and length are ignored.
    NotModified {
        /// The response's metadata.
        meta: ResponseMeta,
    },
}

impl Fetched {
    /// A body answer.
    pub fn body(body: impl AsyncRead + Send + Unpin + 'static, meta: ResponseMeta) -> Self {
        Self::Body { body: Box::new(body), meta }
    }

    /// A "not modified" answer that keeps the recorded validators.
    #[must_use]
    pub fn not_modified() -> Self {
        Self::NotModified { meta: ResponseMeta::new() }
    }
}

impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Body { meta, .. } => f.debug_struct("Body").field("meta", meta).finish_non_exhaustive(),
            Self::NotModified { meta } => f.debug_struct("NotModified").field("meta", meta).finish(),
        }
    }
}

/// Gets a URL's content from upstream; the cache calls it on a miss and to revalidate a
/// stale entry. Implement it over the HTTP client of your choice, or wrap a closure with
/// [`fetch_fn`].
///
/// The cache runs a fetch on a spawned task (so it completes even if the caller that started
/// it goes away), hence the `Clone + 'static` the cache asks of the fetcher it is handed:
/// share a fetcher that is neither through an [`Arc`], which implements this trait too.
#[async_trait]
pub trait Fetcher: Send + Sync {
    /// Fetch `request`'s URL. With [validators](FetchRequest::validators), make a conditional
    /// request and answer [`Fetched::NotModified`] if the server says so.
    ///
    /// # Errors
    ///
    /// Any failure; it reaches every caller waiting on this fetch as
    /// [`Error::Fetch`](crate::Error::Fetch). A failure while streaming the body is reported
    /// by the body's reader instead (and becomes [`Source`](dunite_core::Error::Source)).
    async fn fetch(&self, request: FetchRequest) -> Result<Fetched, FetchError>;
}

#[async_trait]
impl<T: Fetcher + ?Sized> Fetcher for Arc<T> {
    async fn fetch(&self, request: FetchRequest) -> Result<Fetched, FetchError> {
        (**self).fetch(request).await
    }
}

/// A [`Fetcher`] made from a closure; see [`fetch_fn`].
#[derive(Clone)]
pub struct FetchFn<C> {
    f: C,
}

impl<C> fmt::Debug for FetchFn<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchFn").finish_non_exhaustive()
    }
}

/// A [`Fetcher`] from a closure that takes the [`FetchRequest`] and returns a future of the
/// answer.
///
/// # Example
///
/// ```
/// use dunite_download::{FetchError, Fetched, ResponseMeta, fetch_fn};
///
/// let fetcher = fetch_fn(|request| async move {
///     let body = format!("the content of {}", request.url()).into_bytes();
///     let meta = ResponseMeta::new().with_content_length(body.len() as u64);
///     Ok::<_, FetchError>(Fetched::body(std::io::Cursor::new(body), meta))
/// });
/// # let _ = fetcher;
/// ```
pub fn fetch_fn<C, Fut>(f: C) -> FetchFn<C>
where
    C: Fn(FetchRequest) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Fetched, FetchError>> + Send,
{
    FetchFn { f }
}

#[async_trait]
impl<C, Fut> Fetcher for FetchFn<C>
where
    C: Fn(FetchRequest) -> Fut + Send + Sync,
    Fut: Future<Output = Result<Fetched, FetchError>> + Send,
{
    async fn fetch(&self, request: FetchRequest) -> Result<Fetched, FetchError> {
        (self.f)(request).await
    }
}
