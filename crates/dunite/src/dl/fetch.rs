//! How downloads are fetched: an HTTP client that stays on the allowlist and off private
//! networks (both defined in `crate::net`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{StatusCode, header};
use futures_util::TryStreamExt as _;
use reqwest::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH};

use dunite_download::{FetchError, FetchRequest, Fetched, Fetcher, ResponseMeta, UrlKey};

use crate::limits::{Busy, FillPermit};
use crate::metrics::Metrics;
use crate::net::{AllowList, PrivateNetworks, PublicOnly};

/// An upstream answer that is not a body: relayed to the client with its status.
#[derive(Debug, thiserror::Error)]
#[error("upstream answered {0}")]
pub(super) struct UpstreamStatus(pub(super) StatusCode);

/// Fetches over HTTP(S) with reqwest, conditionally when given validators.
#[derive(Debug, Clone)]
pub(crate) struct HttpFetcher {
    client: reqwest::Client,
    /// The server's metrics: upstream answers and the bytes received.
    metrics: Arc<Metrics>,
}

impl HttpFetcher {
    /// A client that follows redirects only within `allow` (host and port) and, unless
    /// `private` allows it, reaches only public addresses through host names.
    pub(crate) fn new(
        allow: AllowList,
        private: PrivateNetworks,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let allow = Arc::new(allow);
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                attempt.error("too many redirects")
            } else if allow.permits(attempt.url()) {
                attempt.follow()
            } else {
                attempt.error("redirect to a host or port outside the download allowlist")
            }
        });
        let client = crate::upstream::http_client(timeout)
            // No proxy from the environment (HTTP_PROXY and such): a proxy would resolve the
            // host itself, past the public-only resolver below.
            .no_proxy()
            .redirect(policy)
            .dns_resolver(Arc::new(PublicOnly::new(private)))
            .build()?;
        Ok(Self { client, metrics })
    }
}

impl HttpFetcher {
    /// `GET url`, conditional on `validators` when given.
    pub(super) async fn get(
        &self,
        url: &UrlKey,
        validators: Option<&dunite_download::Validators>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut get = self.client.get(url.as_str());
        if let Some(validators) = validators {
            if let Some(etag) = validators.etag() {
                get = get.header(IF_NONE_MATCH, etag);
            }
            if let Some(modified) = validators.last_modified() {
                get = get.header(IF_MODIFIED_SINCE, modified);
            }
        }
        self.metrics.upstream(get.send()).await.map_err(crate::upstream::redact)
    }
}

/// What a download cache records of an upstream response.
pub(super) fn meta_of(response: &reqwest::Response) -> ResponseMeta {
    let text = |name: header::HeaderName| {
        response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    let mut meta = ResponseMeta::new();
    if let Some(v) = text(header::CONTENT_TYPE) {
        meta = meta.with_content_type(v);
    }
    if let Some(v) = text(header::ETAG) {
        meta = meta.with_etag(v);
    }
    if let Some(v) = text(header::LAST_MODIFIED) {
        meta = meta.with_last_modified(v);
    }
    if let Some(n) = response.content_length() {
        meta = meta.with_content_length(n);
    }
    meta
}

#[async_trait]
impl Fetcher for HttpFetcher {
    async fn fetch(&self, request: FetchRequest) -> Result<Fetched, FetchError> {
        self.fetch_holding(request, None).await
    }
}

/// The fetcher of one request's fill: [`HttpFetcher`], with the permit the request took
/// under the fill limits. It is used only if the fill is this request's own (a request that
/// joins a running fill never fetches), and then held until the body's last byte.
#[derive(Debug, Clone)]
pub(crate) struct LimitedFetch {
    inner: HttpFetcher,
    permit: Arc<std::sync::Mutex<Option<Result<FillPermit, Busy>>>>,
}

impl LimitedFetch {
    pub(crate) fn new(inner: &HttpFetcher, permit: Result<FillPermit, Busy>) -> Self {
        Self { inner: inner.clone(), permit: Arc::new(std::sync::Mutex::new(Some(permit))) }
    }
}

#[async_trait]
impl Fetcher for LimitedFetch {
    async fn fetch(&self, request: FetchRequest) -> Result<Fetched, FetchError> {
        let permit = self.permit.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let permit = permit.transpose().map_err(Box::new)?;
        self.inner.fetch_holding(request, permit).await
    }
}

impl HttpFetcher {
    /// Fetch `request`, holding `permit` (if any) until the body ends.
    async fn fetch_holding(
        &self,
        request: FetchRequest,
        permit: Option<FillPermit>,
    ) -> Result<Fetched, FetchError> {
        let response = self.get(request.url(), request.validators()).await?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::not_modified());
        }
        if !status.is_success() {
            return Err(Box::new(UpstreamStatus(status)));
        }
        let meta = meta_of(&response);
        let stream =
            crate::upstream::body(response, &self.metrics.upstream_bytes()).map_err(std::io::Error::other);
        let reader = match permit {
            Some(permit) => {
                Box::pin(tokio_util::io::StreamReader::new(crate::limits::holding(stream, permit)))
                    as std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>
            }
            None => Box::pin(tokio_util::io::StreamReader::new(stream)),
        };
        Ok(Fetched::body(reader, meta))
    }
}
