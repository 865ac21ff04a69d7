//! The server: the features' routes merged, request logging, `/metrics`, `/healthz`, `/readyz`
//! and graceful shutdown, over plain HTTP or TLS. Each feature (`oci::Mirror`, `dl::Proxy`,
//! `admin::Admin`) owns its state; this file
//! only opens them on one database and serves them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::{IncomingStream, Listener};

use dunite_core::{Database, DatabaseOptions};

use crate::admin::Admin;
use crate::auth::{self, Area, ClientAuth};
use crate::config::Config;
use crate::dirlock::DirLock;
use crate::dl::Proxy;
use crate::limits::FillLimits;
use crate::metrics::{CacheOutcome, CacheReading, Format, Metrics, Outcome, Reading, Route};
use crate::oci::Mirror;
use crate::peer::{NoDelay, PeerAddr};
use crate::start::StartError;
use crate::tls::{ServerTls, TlsListener};

/// The server: each feature with its own state, and what they share.
#[derive(Debug)]
pub struct App {
    /// The resolved configuration.
    pub config: Config,
    /// The OCI pull-through mirror (`/v2/`).
    mirror: Arc<Mirror>,
    /// The download proxy (`/dl/`).
    proxy: Arc<Proxy>,
    /// The metrics registry, shared with the features.
    metrics: Arc<Metrics>,
    /// Client authentication and grants per area.
    auth: Arc<ClientAuth>,
    /// The fill limits (shared with the features).
    limits: Arc<FillLimits>,
    /// The metadata database, for `/readyz`.
    database: Database,
    /// The admin API (`/admin/`), over the other features' caches.
    admin: Arc<Admin>,
    /// The data directory's lock, held shared while this server runs (`dunite check` waits
    /// for none).
    _lock: DirLock,
}

/// How long each of `/readyz`'s checks may take before the instance is reported not ready.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

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
        let lock = DirLock::shared(dir)
            .map_err(io(&crate::dirlock::path(dir)))?
            .ok_or_else(|| StartError::InUse(crate::dirlock::path(dir)))?;
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
        for warning in config.exposure_warnings() {
            tracing::warn!("{warning}");
        }
        let auth = Arc::new(ClientAuth::load(&config.auth)?);
        let metrics = Arc::new(Metrics::new());
        let limits = Arc::new(FillLimits::new(config.max_fills, config.max_fills_per_client));
        let mirror = Mirror::open(&config, &database, Arc::clone(&metrics), Arc::clone(&limits)).await?;
        let proxy = Proxy::open(&config, &database, Arc::clone(&metrics), Arc::clone(&limits)).await?;
        for (name, cache) in mirror.caches().into_iter().chain(proxy.caches()) {
            metrics.watch_evictions(name, cache);
        }
        let (mirror, proxy) = (Arc::new(mirror), Arc::new(proxy));
        let admin = Arc::new(Admin::new(Arc::clone(&mirror), Arc::clone(&proxy)));
        Ok(Arc::new(Self { config, mirror, proxy, metrics, auth, limits, database, admin, _lock: lock }))
    }

    /// On every SIGHUP, read the client user and token files again (`--htpasswd`,
    /// `--client-token-file`); a file that does not load is logged and the ones before stay
    /// in use. `None` when no such file is configured. Requires a Tokio runtime; the handler
    /// is registered when this is called.
    ///
    /// # Errors
    ///
    /// If the signal handler cannot be registered.
    #[cfg(unix)]
    pub fn reload_client_auth_on_sighup(
        self: &Arc<Self>,
    ) -> std::io::Result<Option<impl Future<Output = ()> + Send + 'static + use<>>> {
        if !self.auth.has_files() {
            return Ok(None);
        }
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let auth = Arc::clone(&self.auth);
        Ok(Some(async move {
            while hangup.recv().await.is_some() {
                let reloading = Arc::clone(&auth);
                match tokio::task::spawn_blocking(move || reloading.reload()).await {
                    Ok(Ok((users, tokens))) => {
                        tracing::info!(users, tokens, "SIGHUP: client users and tokens reloaded");
                    }
                    Ok(Err(error)) => tracing::error!(
                        error = %crate::error_chain(&error),
                        "SIGHUP: cannot reload the client users and tokens; still using the ones before"
                    ),
                    Err(error) => tracing::error!(%error, "SIGHUP: the client credentials reload failed"),
                }
            }
        }))
    }

    /// The routes: each feature's and `/metrics`, each behind its area's access check, and
    /// `/healthz` and `/readyz` (open to all), all behind the request log.
    pub fn router(self: &Arc<Self>) -> Router {
        let guarded = |router: Router, area: Area| {
            router.route_layer(middleware::from_fn_with_state((Arc::clone(&self.auth), area), auth::guard))
        };
        let metrics_route = Router::new().route("/metrics", get(metrics)).with_state(Arc::clone(self));
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz).with_state(Arc::clone(self)))
            .merge(guarded(metrics_route, Area::Metrics))
            .merge(guarded(self.mirror.routes(), Area::Pull))
            .merge(guarded(self.proxy.routes(), Area::Download))
            .merge(guarded(self.admin.routes(), Area::Admin))
            .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
            .layer(middleware::from_fn_with_state(Arc::clone(&self.metrics), log_request))
    }
}

/// `GET /readyz`: whether this instance can serve now (for a load balancer's readiness
/// check; `/healthz` only says the process answers). `200 ready` when the metadata database
/// answers a `SELECT 1` and a file can be created and removed in the blob cache's `tmp/` (where
/// fills spool), each within [`READY_TIMEOUT`]; else `503` naming what failed.
async fn readyz(State(app): State<Arc<App>>) -> Response {
    let tmp = app.config.data_dir.join("blobs").join("tmp");
    let (database, disk) = tokio::join!(database_ready(&app.database), disk_ready(&tmp));
    let failures: Vec<String> = [database.err(), disk.err()].into_iter().flatten().collect();
    if failures.is_empty() {
        return "ready\n".into_response();
    }
    tracing::warn!(failures = failures.join("; "), "not ready");
    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", failures.join("; "))).into_response()
}

/// The database answers a trivial query within [`READY_TIMEOUT`].
async fn database_ready(database: &Database) -> Result<(), String> {
    match tokio::time::timeout(READY_TIMEOUT, database.ping()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("database: {error}")),
        Err(_) => Err(format!("database: no answer within {READY_TIMEOUT:?}")),
    }
}

/// A file can be created, written, synced and removed in `dir` within [`READY_TIMEOUT`].
async fn disk_ready(dir: &std::path::Path) -> Result<(), String> {
    let dir = dir.to_path_buf();
    let shown = dir.display().to_string();
    let probe = tokio::task::spawn_blocking(move || {
        let mut file = tempfile::Builder::new().prefix("readyz-").tempfile_in(&dir)?;
        std::io::Write::write_all(&mut file, b"ready")?;
        file.as_file().sync_all()?;
        file.close()
    });
    match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(format!("disk: {shown}: {error}")),
        Ok(Err(error)) => Err(format!("disk: {error}")),
        Err(_) => Err(format!("disk: {shown}: no answer within {READY_TIMEOUT:?}")),
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

/// `GET /metrics`: OpenMetrics text if the scraper asks for it (Prometheus does), else the
/// Prometheus text format 0.0.4.
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let fills = app.mirror.fills_in_flight();
    let mut caches = Vec::new();
    for (name, cache) in app.mirror.caches().into_iter().chain(app.proxy.caches()) {
        let stats = cache.stats();
        caches.push((
            name,
            CacheReading {
                bytes: cache.total_bytes().await.unwrap_or(0),
                max_bytes: cache.evictor().policy().max_bytes(),
                entries: cache.len().await.unwrap_or(0),
                passes: stats.evictor.passes,
                pokes_coalesced: stats.evictor.pokes_coalesced,
                evicted: stats.evictor.entries_evicted,
                evictor_errors: stats.evictor.errors,
                passes_elsewhere: stats.evictor.passes_elsewhere,
                fills_in_flight: fills.iter().find(|(of, _)| *of == name).map(|(_, n)| *n as u64),
            },
        ));
    }
    let reading = Reading { caches, fills_in_flight: app.limits.in_flight() as u64 };
    let format = Format::accepted(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let (content_type, text) = app.metrics.render(reading, format);
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// One info line per request (method, path, status, bytes, cache outcome, duration), and its
/// time to the response head in `dunite_request_duration_seconds` by route and outcome.
async fn log_request(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    // The path only: query strings may carry what does not belong in logs.
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let outcome = response.extensions().get::<CacheOutcome>().copied();
    metrics.request(Route::of(&path), Outcome::of(response.status(), outcome), elapsed);
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
        duration_ms = elapsed.as_millis() as u64,
        "request"
    );
    response
}

/// Serve plain HTTP on `listener` until `shutdown` resolves, then let in-flight responses
/// finish for up to the configured grace period. Requires a Tokio runtime.
///
/// # Errors
///
/// If serving fails.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(app, NoDelay::new(listener), shutdown).await
}

/// As [`serve`], over TLS: each connection's handshake runs in a task of its own, bounded by
/// [`HANDSHAKE_TIMEOUT`](crate::tls::HANDSHAKE_TIMEOUT), with the certificate `tls` holds at
/// that moment (a [`ServerTls::reload`] changes it for the handshakes after it, not for the
/// connections already open). A client that fails its handshake (a plain-HTTP request
/// among them) is closed without an answer. Requires a Tokio runtime.
///
/// # Errors
///
/// If serving fails.
pub async fn serve_tls(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    tls: &ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(app, TlsListener::new(NoDelay::new(listener), tls), shutdown).await
}

/// The server, whatever the connections are: the router, graceful shutdown, the grace
/// period's deadline.
async fn serve_on<L>(
    app: Arc<App>,
    listener: L,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
    for<'a> PeerAddr: Connected<IncomingStream<'a, L>>,
{
    let grace = app.config.shutdown_grace;
    let router = app.router();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The peer's address reaches handlers (`Peer`): fill limits per client, loopback checks.
    let service = router.into_make_service_with_connect_info::<PeerAddr>();
    let server = axum::serve(listener, service).with_graceful_shutdown(async move {
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
pub async fn wait_until_listening(addr: SocketAddr, deadline: Duration) -> std::io::Result<()> {
    let give_up = Instant::now() + deadline;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= give_up => return Err(e),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_disk_check_fails_where_no_file_can_be_created() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(disk_ready(dir.path()).await, Ok(()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the probe left a file");
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, b"x").unwrap();
        let error = disk_ready(&not_a_dir).await.unwrap_err();
        assert!(error.starts_with("disk: "), "{error}");
    }

    #[tokio::test]
    async fn the_database_check_answers_for_a_live_database() {
        let dir = tempfile::tempdir().unwrap();
        let database =
            Database::open_sqlite(&dir.path().join("m.db"), &DatabaseOptions::new()).await.unwrap();
        assert_eq!(database_ready(&database).await, Ok(()));
        database.pool().close().await;
        assert!(database_ready(&database).await.unwrap_err().starts_with("database: "));
    }
}
