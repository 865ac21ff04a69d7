//! The server: shared state, routes, request logging and graceful shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::serve::ListenerExt as _;

use dunite_core::{
    CacheOptions, Database, DatabaseOptions, EntryCache, EvictionPolicy, FillOptions, OnConflict,
};
use dunite_oci::BlobCache;

use crate::config::Config;
use crate::metrics::{CacheGauges, Metrics};
use crate::oci;
use crate::upstream::Registries;

/// How a request was answered, recorded by handlers for the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// From the cache.
    Hit,
    /// From the upstream (and cached).
    Miss,
    /// From the cache, stale, because the upstream was down.
    Stale,
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct App {
    /// The resolved configuration.
    pub config: Config,
    /// OCI blobs by digest.
    pub(crate) blobs: BlobCache,
    /// OCI manifests by digest (meta: media type).
    pub(crate) manifests: EntryCache,
    /// Tag -> digest records (empty payloads; meta: JSON).
    pub(crate) tags: EntryCache,
    /// Downloads by canonical URL.
    pub(crate) downloads: dunite_download::DownloadCache,
    /// How downloads are fetched.
    pub(crate) fetcher: crate::dl::HttpFetcher,
    /// Upstream registries.
    pub(crate) registries: Registries,
    /// Counters.
    pub(crate) metrics: Metrics,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A cache could not be opened.
    #[error("cannot open the cache: {0}")]
    Cache(#[from] dunite_core::Error),
    /// The blob cache could not be opened.
    #[error("cannot open the blob cache: {0}")]
    Blobs(#[from] dunite_oci::Error),
    /// The download cache could not be opened.
    #[error("cannot open the download cache: {0}")]
    Downloads(#[from] dunite_download::Error),
    /// The upstream client could not be built.
    #[error("cannot set up upstream access: {0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// A directory could not be prepared.
    #[error("cannot prepare {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl App {
    /// Open the caches (one metadata database for all of them) and the upstream client.
    /// Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`StartError`] naming what could not be opened.
    pub async fn open(config: Config) -> Result<Arc<Self>, StartError> {
        let dir = &config.data_dir;
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| StartError::Io { path, source }
        };
        tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        // A short acquire timeout: during a database outage the first caller waits it out
        // before the pool fails fast (see `Database`).
        let options =
            DatabaseOptions::new().with_max_connections(8).with_acquire_timeout(Duration::from_secs(10));
        let database = match &config.database_url {
            Some(url) => Database::connect(url, &options).await?,
            None => Database::open_sqlite(&dir.join("metadata.db"), &options).await?,
        };
        // Fills spool in each cache's own `tmp/` (cleaned at start-up like any unfinished
        // store); `spool/` is where older versions spooled: what is left there is worthless,
        // but with a shared database, young files may be an older instance's fills in flight.
        remove_stale_spools(&dir.join("spool"), database.orphan_grace()).await;
        let fills = FillOptions::new().with_idle_timeout(config.upstream_timeout);
        let blobs = BlobCache::new(
            BlobCache::options(dir.join("blobs"), EvictionPolicy::new(config.oci_max_bytes))
                .with_database(database.clone()),
        )
        .await?
        .with_fill_options(fills.clone());
        let manifest_cap = (config.oci_max_bytes / 16).max(64 << 20);
        let manifests = EntryCache::open(
            CacheOptions::new(dir.join("manifests"), "oci-manifests", EvictionPolicy::new(manifest_cap))
                .with_database(database.clone())
                .with_on_conflict(OnConflict::KeepExisting),
        )
        .await?;
        let tags = EntryCache::open(
            CacheOptions::new(dir.join("tags"), "oci-tags", EvictionPolicy::new(config.tag_max_bytes))
                .with_database(database.clone())
                .with_on_conflict(OnConflict::Replace),
        )
        .await?;
        let downloads = dunite_download::DownloadCache::new(
            dunite_download::DownloadCache::options(
                dir.join("downloads"),
                EvictionPolicy::new(config.dl_max_bytes),
            )
            .with_database(database.clone()),
            config.dl_freshness,
        )
        .await?
        .with_fill_options(fills);
        let private = if config.dl_allow_private_networks {
            crate::dl::PrivateNetworks::Allowed
        } else {
            crate::dl::PrivateNetworks::Refused
        };
        let fetcher = crate::dl::HttpFetcher::new(config.dl_allow.clone(), private, config.upstream_timeout)
            .map_err(|e| StartError::Upstream(crate::upstream::UpstreamError::Http(e)))?;
        let registries =
            Registries::new(config.upstreams.clone(), config.credentials.clone(), config.upstream_timeout)?;
        Ok(Arc::new(Self {
            config,
            blobs,
            manifests,
            tags,
            downloads,
            fetcher,
            registries,
            metrics: Metrics::default(),
        }))
    }

    /// The routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v2/", get(oci::root))
            .route("/v2", get(oci::root))
            // Every method reaches the dispatcher, which answers non-pulls with the spec error.
            .route("/v2/{*rest}", any(oci::dispatch))
            .route("/dl/{*url}", get(crate::dl::download))
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
            .layer(middleware::from_fn_with_state(Arc::clone(self), log_request))
            .with_state(Arc::clone(self))
    }
}

/// Delete the spool files last written at least `grace` ago (all of them for a zero grace).
async fn remove_stale_spools(dir: &std::path::Path, grace: Duration) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else { return };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let stale = grace.is_zero()
            || entry
                .metadata()
                .await
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified.elapsed().is_ok_and(|age| age >= grace));
        if stale {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut caches = Vec::new();
    for (name, cache) in [
        ("blobs", app.blobs.entries()),
        ("manifests", &app.manifests),
        ("tags", &app.tags),
        ("downloads", app.downloads.entries()),
    ] {
        let stats = cache.stats();
        caches.push((
            name,
            CacheGauges {
                bytes: cache.total_bytes().await.unwrap_or(0),
                max_bytes: cache.evictor().policy().max_bytes(),
                entries: cache.len().await.unwrap_or(0),
                passes: stats.evictor.passes,
                pokes_coalesced: stats.evictor.pokes_coalesced,
                evicted: stats.evictor.entries_evicted,
                evictor_errors: stats.evictor.errors,
                passes_elsewhere: stats.evictor.passes_elsewhere,
            },
        ));
    }
    ([("content-type", "text/plain; version=0.0.4")], app.metrics.render(&caches)).into_response()
}

/// One info line per request: method, path, status, bytes, cache outcome, duration.
async fn log_request(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    // The path only: query strings may carry what does not belong in logs.
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    app.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let outcome = response.extensions().get::<CacheOutcome>().copied();
    let bytes =
        response.headers().get("content-length").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    tracing::info!(
        %method,
        path,
        status = response.status().as_u16(),
        bytes,
        cache = outcome.map_or("-", |o| match o {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Stale => "stale",
        }),
        duration_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}

/// Serve on `listener` until `shutdown` resolves, then let in-flight responses finish for up
/// to the configured grace period.
///
/// # Errors
///
/// If serving fails.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = app.config.shutdown_grace;
    let router = app.router();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // TCP_NODELAY: a response's head and its body's chunks are separate writes, and with
    // Nagle's algorithm the second small write waits for the client's (delayed, up to 40 ms)
    // ACK of the first: a 40 ms stall on small blobs, manifests and downloads.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
    });
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!(
            grace_s = grace.as_secs(),
            "shutting down: no new connections, finishing in-flight ones"
        );
        let _ = stop_tx.send(());
    });
    let deadline = async move {
        if stop_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!("grace period over; dropping the connections still open");
            Ok(())
        }
    }
}

/// A future that resolves on SIGTERM or ctrl-c. The SIGTERM handler is registered when this
/// is called, not when the future is first polled: call it first thing, so a SIGTERM that
/// arrives while the caches are still opening is kept and shuts the server down cleanly
/// instead of killing the process. Requires a Tokio runtime.
#[must_use = "the future does nothing unless awaited"]
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async move {
            match term {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            () = ctrl_c => {}
            () = term => {}
        }
    }
}

/// How long to wait between polls in [`wait_until_listening`].
const POLL: Duration = Duration::from_millis(20);

/// Wait until something accepts connections on `addr`, up to `deadline` (for tests and
/// supervisors).
///
/// # Errors
///
/// If nothing listens by then.
pub async fn wait_until_listening(addr: std::net::SocketAddr, deadline: Duration) -> std::io::Result<()> {
    let give_up = Instant::now() + deadline;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= give_up => return Err(e),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}
