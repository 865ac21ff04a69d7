//! The download proxy: `GET /dl/<url>` and `GET /dl/sha256:<hex>/<url>`. [`Proxy`] owns the
//! download cache (and its fills) and the fetcher.
//!
//! Only hosts (and ports) on the allowlist (`--dl-allow`) are fetched, redirects that leave it are
//! refused, and nothing else is reachable: this is not an open proxy. An entry past its
//! freshness is revalidated with its ETag / Last-Modified.
//!
//! One concept per file: `target.rs` (what a request asks for), `fetch.rs` (the HTTP client
//! and its resolver), `error.rs` (every failure and its one mapping to a status).

mod error;
mod fetch;
mod target;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use dunite_core::{ContentDigest, Database, EntryCache, EvictionPolicy, FillOptions};
use dunite_download::{DownloadCache, DownloadRequest, Lookup, Source};

use crate::config::Config;
use crate::limits::FillLimits;
use crate::metrics::{ByteSource, CacheOutcome, Metrics};
use crate::net::{AllowList, PrivateNetworks};
use crate::peer::Peer;
use crate::start::StartError;

pub(crate) use error::Error;
pub(crate) use fetch::{HttpFetcher, LimitedFetch};
pub(crate) use target::Target;

/// The download cache's name in `/metrics`.
const CACHE: &str = "downloads";

/// The download proxy's state: its cache (with its fills) and its fetcher.
#[derive(Debug)]
pub(crate) struct Proxy {
    /// Downloads by canonical URL.
    downloads: DownloadCache,
    /// How downloads are fetched.
    fetcher: HttpFetcher,
    /// The hosts (and ports) downloads may come from.
    allow: AllowList,
    /// The server's counters.
    metrics: Arc<Metrics>,
    /// The limits on concurrent fills (shared with the mirror).
    limits: Arc<FillLimits>,
}

impl Proxy {
    /// Open the download cache on `database` (under `config.data_dir`) and the fetcher.
    /// Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`StartError`] naming what could not be opened.
    pub(crate) async fn open(
        config: &Config,
        database: &Database,
        metrics: Arc<Metrics>,
        limits: Arc<FillLimits>,
    ) -> Result<Self, StartError> {
        let downloads = DownloadCache::new(
            DownloadCache::options(
                config.data_dir.join("downloads"),
                EvictionPolicy::new(config.dl_max_bytes),
            )
            .with_database(database.clone()),
            config.dl_freshness,
        )
        .await?
        .with_fill_options(FillOptions::new().with_idle_timeout(config.upstream_timeout));
        let private = PrivateNetworks::allowed_if(config.dl_allow_private_networks);
        let fetcher =
            HttpFetcher::new(config.dl_allow.clone(), private, config.upstream_timeout, Arc::clone(&metrics))
                .map_err(|e| StartError::Upstream(crate::upstream::UpstreamError::Http(e)))?;
        Ok(Self { downloads, fetcher, allow: config.dl_allow.clone(), metrics, limits })
    }

    /// `/dl/...`, with the proxy as state.
    pub(crate) fn routes(self: &Arc<Self>) -> Router {
        Router::new().route("/dl/{*url}", get(download)).with_state(Arc::clone(self))
    }

    /// The caches, by the name `/metrics` shows.
    pub(crate) fn caches(&self) -> [(&'static str, &EntryCache); 1] {
        [(CACHE, self.downloads.entries())]
    }
}

/// `GET /dl/<url>` or `GET /dl/sha256:<hex>/<url>`.
async fn download(
    State(proxy): State<Arc<Proxy>>,
    peer: Peer,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Response {
    match serve(&proxy, peer, &uri, query.as_deref()).await {
        Ok(response) => response,
        Err(error) => {
            let status = error.status();
            proxy.metrics.failed(status, status == axum::http::StatusCode::TOO_MANY_REQUESTS);
            error.into_response()
        }
    }
}

async fn serve(proxy: &Arc<Proxy>, peer: Peer, uri: &Uri, query: Option<&str>) -> Result<Response, Error> {
    // The path as sent, not percent-decoded: `%2F`, `%3F` or `%23` in the target URL belong
    // to it (`group%2Fproject` is one segment), so they are handed on as they came.
    let rest = uri.path().strip_prefix("/dl/").unwrap_or_default();
    let Target { url, address, pin } = Target::parse(rest, query)?;
    if !proxy.allow.permits(&address) {
        return Err(Error::NotAllowed);
    }
    let mut request = DownloadRequest::new(url);
    if let Some(pin) = pin {
        request = request.with_sha256(pin);
    }
    // One metadata read: a fresh hit is served at once; anything else is a fill (which
    // revalidates a stale entry, or fetches), streamed.
    match proxy.downloads.lookup(&request).await? {
        Lookup::Fresh(download) => Ok(serve_hit(proxy, *download).await),
        seen => stream_fill(proxy, peer, &request, &seen).await,
    }
}

/// A fresh cached download.
async fn serve_hit(proxy: &Proxy, download: dunite_download::Download) -> Response {
    proxy.metrics.download_hit();
    let info = download.info().clone();
    let file = download.into_file().into_std().await;
    let served = proxy.metrics.served(CACHE, ByteSource::Cache);
    let mut response = Response::new(crate::body::file_body(file, 0, info.size(), &served));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size()));
    put_headers(headers, info.content_type(), info.validators(), Some(info.sha256()));
    response.extensions_mut().insert(CacheOutcome::Hit);
    response
}

/// A download with no fresh entry: one fill per URL and pin (`DownloadCache::fill`, which
/// revalidates a stale entry or fetches), streamed to every client as it arrives and
/// verified against the pin before the last byte. A failure ends every client's stream with
/// an error; nothing is cached.
async fn stream_fill(
    proxy: &Arc<Proxy>,
    peer: Peer,
    request: &DownloadRequest,
    seen: &Lookup,
) -> Result<Response, Error> {
    // Taken now, used only if this request starts the fill (joining one costs nothing).
    let fetcher = LimitedFetch::new(&proxy.fetcher, proxy.limits.try_start(peer.ip()));
    let mut joined = proxy.downloads.fill(request, seen, &fetcher)?;
    let started = joined.started().await.map_err(|e| dunite_download::Error::from_fill(request.url(), e))?;
    let head = started.head();
    let (outcome, source) = match head.source() {
        Source::Hit => (CacheOutcome::Hit, ByteSource::Cache),
        Source::Revalidated => (CacheOutcome::Miss, ByteSource::Cache),
        _ => (CacheOutcome::Miss, ByteSource::Upstream),
    };
    match outcome {
        CacheOutcome::Hit => proxy.metrics.download_hit(),
        _ => proxy.metrics.download_miss(),
    }
    if source == ByteSource::Upstream && matches!(seen, Lookup::Missing) {
        proxy.metrics.refill(CACHE, request.url().as_str());
    }
    let mut response = Response::new(Body::empty());
    let headers = response.headers_mut();
    if let Some(total) = started.total() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    }
    put_headers(headers, head.content_type(), head.validators(), head.sha256());
    let served = proxy.metrics.served(CACHE, source);
    *response.body_mut() = Body::from_stream(crate::metrics::metered(joined.body(0, None), &served));
    response.extensions_mut().insert(outcome);
    Ok(response)
}

/// The headers a download is served with.
fn put_headers(
    headers: &mut axum::http::HeaderMap,
    content_type: Option<&str>,
    validators: &dunite_download::Validators,
    sha256: Option<&ContentDigest>,
) {
    let mut put = |name: header::HeaderName, value: Option<&str>| {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    };
    put(header::CONTENT_TYPE, content_type.or(Some("application/octet-stream")));
    put(header::ETAG, validators.etag());
    put(header::LAST_MODIFIED, validators.last_modified());
    put(header::HeaderName::from_static("x-content-sha256"), sha256.map(ContentDigest::hex).as_deref());
}
