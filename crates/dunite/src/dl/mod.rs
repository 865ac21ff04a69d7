//! The download proxy: `GET /dl/<url>` and `GET /dl/sha256:<hex>/<url>`. [`Proxy`] owns the
//! download cache, the fetcher and the download fills.
//!
//! Only hosts on the allowlist (`--dl-allow`) are fetched, redirects that leave it are
//! refused, and nothing else is reachable: this is not an open proxy. An entry past its
//! freshness is revalidated with its ETag / Last-Modified.
//!
//! One concept per file: `target.rs` (what a request asks for), `fetch.rs` (the HTTP client
//! and its resolver), `error.rs` (every failure and its one mapping to a status).

mod error;
mod fetch;
mod target;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use dunite_core::{ContentDigest, Database, EntryCache, EvictionPolicy};
use dunite_download::{DownloadCache, DownloadRequest, Lookup, Source};

use crate::config::Config;
use crate::fill::{FillState, Fills, fill_from_upstream};
use crate::metrics::{CacheOutcome, Metrics};
use crate::start::StartError;

pub(crate) use error::Error;
pub(crate) use fetch::{HttpFetcher, PrivateNetworks};
pub(crate) use target::Target;

/// The download proxy's state: its cache, its fetcher, its fills.
#[derive(Debug)]
pub(crate) struct Proxy {
    /// Downloads by canonical URL.
    downloads: DownloadCache,
    /// How downloads are fetched.
    fetcher: HttpFetcher,
    /// The hosts downloads may come from.
    allow: Vec<String>,
    /// In-flight download fills, by pin and URL.
    fills: Fills<String>,
    /// Where fills spool.
    spool_dir: PathBuf,
    /// The server's counters.
    metrics: Arc<Metrics>,
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
        spool_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let downloads = DownloadCache::new(
            DownloadCache::options(
                config.data_dir.join("downloads"),
                EvictionPolicy::new(config.dl_max_bytes),
            )
            .with_database(database.clone()),
            config.dl_freshness,
        )
        .await?;
        let private = if config.dl_allow_private_networks {
            PrivateNetworks::Allowed
        } else {
            PrivateNetworks::Refused
        };
        let fetcher = HttpFetcher::new(config.dl_allow.clone(), private, config.upstream_timeout)
            .map_err(|e| StartError::Upstream(crate::upstream::UpstreamError::Http(e)))?;
        Ok(Self {
            downloads,
            fetcher,
            allow: config.dl_allow.clone(),
            fills: Fills::default(),
            spool_dir,
            metrics,
        })
    }

    /// `/dl/...`, with the proxy as state.
    pub(crate) fn routes(self: &Arc<Self>) -> Router {
        Router::new().route("/dl/{*url}", get(download)).with_state(Arc::clone(self))
    }

    /// The caches, by the name `/metrics` shows.
    pub(crate) fn caches(&self) -> [(&'static str, &EntryCache); 1] {
        [("downloads", self.downloads.entries())]
    }
}

/// `GET /dl/<url>` or `GET /dl/sha256:<hex>/<url>`.
async fn download(State(proxy): State<Arc<Proxy>>, uri: Uri, RawQuery(query): RawQuery) -> Response {
    match serve(&proxy, &uri, query.as_deref()).await {
        Ok(response) => response,
        Err(error) => {
            if error.status().is_server_error() {
                proxy.metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
            error.into_response()
        }
    }
}

async fn serve(proxy: &Arc<Proxy>, uri: &Uri, query: Option<&str>) -> Result<Response, Error> {
    // The path as sent, not percent-decoded: `%2F`, `%3F` or `%23` in the target URL belong
    // to it (`group%2Fproject` is one segment), so they are handed on as they came.
    let rest = uri.path().strip_prefix("/dl/").unwrap_or_default();
    let Target { url, host, pin } = Target::parse(rest, query)?;
    if !proxy.allow.contains(&host) {
        return Err(Error::NotAllowed);
    }
    let mut request = DownloadRequest::new(url);
    if let Some(pin) = pin {
        request = request.with_sha256(pin);
    }
    // One metadata read: a fresh hit is served at once, a miss streams from the upstream;
    // an entry stale or pinned differently is revalidated or refetched by the cache.
    let download = match proxy.downloads.lookup(&request).await? {
        Lookup::Fresh(download) => *download,
        Lookup::Missing => return stream_miss(proxy, request).await,
        _ => proxy.downloads.get_or_fetch(&request, &proxy.fetcher).await?,
    };
    let outcome = match download.source() {
        Source::Hit => CacheOutcome::Hit,
        _ => CacheOutcome::Miss,
    };
    let counter = if outcome == CacheOutcome::Hit {
        &proxy.metrics.download_hits
    } else {
        &proxy.metrics.download_misses
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let info = download.info().clone();
    let file = download.into_file().into_std().await;
    let mut response =
        Response::new(crate::body::file_body(file, 0, info.size(), &proxy.metrics.bytes_served));
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
    Ok(response)
}

/// A download with no cached entry: one upstream transfer per URL (and pin), streamed to every
/// client as it arrives, stored (and verified against the pin) when complete. A failure ends
/// every client's stream with an error; nothing is cached.
async fn stream_miss(proxy: &Arc<Proxy>, request: DownloadRequest) -> Result<Response, Error> {
    proxy.metrics.download_misses.fetch_add(1, Ordering::Relaxed);
    let key = format!("{}|{}", request.sha256().map(ContentDigest::hex).unwrap_or_default(), request.url());
    let fill_proxy = Arc::clone(proxy);
    let mut subscription = proxy
        .fills
        .join(&key, &proxy.spool_dir, move |spool, state| async move {
            let proxy = fill_proxy;
            let answer = proxy.fetcher.get(request.url(), None).await;
            let downloads = proxy.downloads.clone();
            let upstream_bytes = Arc::clone(&proxy.metrics.upstream_bytes);
            let limit = downloads.entries().entries().max_bytes();
            fill_from_upstream(answer, (spool, state, limit), upstream_bytes, |response| {
                let meta = fetch::meta_of(response);
                let content_type = meta.content_type().map(Arc::from);
                let store = |spool, _written| async move {
                    let fetcher = fetch::SpoolFetcher { spool, meta };
                    downloads
                        .get_or_fetch(&request, &fetcher)
                        .await
                        .map(drop)
                        .map_err(|e| crate::error_chain(&e))
                };
                (content_type, store)
            })
            .await;
        })
        .map_err(Error::Spool)?;
    let (total, content_type) = match subscription.started().await {
        FillState::Failed { status: Some(404), .. } => return Err(Error::NotFound),
        FillState::Failed { message, .. } => return Err(Error::Fill(message)),
        FillState::Streaming { total, content_type, .. } => (total, content_type),
        FillState::Done { written } => (Some(written), None),
        FillState::Connecting => (None, None),
    };
    let stream = crate::metrics::metered(subscription.into_stream(), &proxy.metrics.bytes_served);
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    if let Some(total) = total {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    }
    let content_type = content_type.as_deref().and_then(|v| HeaderValue::from_str(v).ok());
    headers.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    response.extensions_mut().insert(CacheOutcome::Miss);
    Ok(response)
}
