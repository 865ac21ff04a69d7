//! The download proxy: `GET /dl/<url>` and `GET /dl/sha256:<hex>/<url>`.
//!
//! Only hosts on the allowlist (`--dl-allow`) are fetched, redirects that leave it are
//! refused, and nothing else is reachable: this is not an open proxy. An entry past its
//! freshness is revalidated with its ETag / Last-Modified.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt as _;
use reqwest::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH};

use dunite_core::{ContentDigest, DigestAlgorithm};
use dunite_download::{
    DownloadRequest, FetchError, FetchRequest, Fetched, Fetcher, ResponseMeta, Source, UrlKey,
};

use crate::app::{App, CacheOutcome};

/// An upstream answer that is not a body: relayed to the client with its status.
#[derive(Debug, thiserror::Error)]
#[error("upstream answered {0}")]
struct UpstreamStatus(StatusCode);

/// Fetches over HTTP(S) with reqwest, conditionally when given validators.
#[derive(Debug, Clone)]
pub(crate) struct HttpFetcher {
    client: reqwest::Client,
}

impl HttpFetcher {
    /// A client that follows redirects only within `allow`.
    pub(crate) fn new(allow: Vec<String>) -> Result<Self, reqwest::Error> {
        let allow = Arc::new(allow);
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            let host = attempt.url().host_str().map(str::to_ascii_lowercase);
            if attempt.previous().len() >= 5 {
                attempt.error("too many redirects")
            } else if host.is_some_and(|h| allow.contains(&h)) {
                attempt.follow()
            } else {
                attempt.error("redirect to a host outside the download allowlist")
            }
        });
        let client = reqwest::Client::builder()
            .user_agent(concat!("dunite/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .redirect(policy)
            .build()?;
        Ok(Self { client })
    }
}

#[async_trait]
impl Fetcher for HttpFetcher {
    async fn fetch(&self, request: FetchRequest) -> Result<Fetched, FetchError> {
        let mut get = self.client.get(request.url().as_str());
        if let Some(validators) = request.validators() {
            if let Some(etag) = validators.etag() {
                get = get.header(IF_NONE_MATCH, etag);
            }
            if let Some(modified) = validators.last_modified() {
                get = get.header(IF_MODIFIED_SINCE, modified);
            }
        }
        let response = get.send().await?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::not_modified());
        }
        if !status.is_success() {
            return Err(Box::new(UpstreamStatus(status)));
        }
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
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        Ok(Fetched::body(tokio_util::io::StreamReader::new(stream), meta))
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, [("content-type", "text/plain")], format!("{message}\n")).into_response()
}

/// `GET /dl/<url>` or `GET /dl/sha256:<hex>/<url>`.
pub(crate) async fn download(
    State(app): State<Arc<App>>,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let (pin, target) = match rest.strip_prefix("sha256:").and_then(|r| r.split_once('/')) {
        Some((hex, url)) => {
            let Some(digest) =
                hex::decode(hex).ok().and_then(|b| ContentDigest::from_bytes(DigestAlgorithm::Sha256, b))
            else {
                return refuse(StatusCode::BAD_REQUEST, "the sha256 pin must be 64 hex characters");
            };
            (Some(digest), url.to_owned())
        }
        None => (None, rest),
    };
    let target = match query {
        Some(q) => format!("{target}?{q}"),
        None => target,
    };
    let url = match UrlKey::parse(&target) {
        Ok(url) => url,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("not a download URL: {e}")),
    };
    let host = url::Url::parse(url.as_str()).ok().and_then(|u| u.host_str().map(str::to_ascii_lowercase));
    if !host.is_some_and(|h| app.config.dl_allow.contains(&h)) {
        return refuse(StatusCode::FORBIDDEN, "host is not on the download allowlist");
    }
    let mut request = DownloadRequest::new(url);
    if let Some(pin) = pin {
        request = request.with_sha256(pin);
    }
    let download = match app.downloads.get_or_fetch(&request, &app.fetcher).await {
        Ok(download) => download,
        Err(error) => {
            let upstream = match &error {
                dunite_download::Error::Fetch { source, .. } => source.downcast_ref::<UpstreamStatus>(),
                _ => None,
            };
            let status = upstream.map(|s| {
                if s.0 == StatusCode::NOT_FOUND { StatusCode::NOT_FOUND } else { StatusCode::BAD_GATEWAY }
            });
            let status = status.unwrap_or(match &error {
                dunite_download::Error::Cache(dunite_core::Error::DigestMismatch { .. }) => {
                    StatusCode::BAD_GATEWAY
                }
                dunite_download::Error::Cache(dunite_core::Error::TooLarge { .. }) => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                dunite_download::Error::Cache(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_GATEWAY,
            });
            if status.is_server_error() {
                app.metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(%error, "download failed");
            return refuse(status, &error.to_string());
        }
    };
    let outcome = match download.source() {
        Source::Hit => CacheOutcome::Hit,
        _ => CacheOutcome::Miss,
    };
    let counter =
        if outcome == CacheOutcome::Hit { &app.metrics.download_hits } else { &app.metrics.download_misses };
    counter.fetch_add(1, Ordering::Relaxed);
    let info = download.info().clone();
    let stream = crate::metrics::metered(
        tokio_util::io::ReaderStream::new(download.into_file()),
        &app.metrics.bytes_served,
    );
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size()));
    let put = |headers: &mut axum::http::HeaderMap, name: header::HeaderName, value: Option<&str>| {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    };
    put(headers, header::CONTENT_TYPE, info.content_type().or(Some("application/octet-stream")));
    put(headers, header::ETAG, info.etag());
    put(headers, header::LAST_MODIFIED, info.last_modified());
    put(headers, header::HeaderName::from_static("x-content-sha256"), Some(&info.sha256().hex()));
    response.extensions_mut().insert(outcome);
    response
}
