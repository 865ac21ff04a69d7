//! The server: the features' routes merged, request logging, `/metrics`, `/healthz` and
//! graceful shutdown, over plain HTTP or TLS. Each feature (`oci::Mirror`, `dl::Proxy`,
//! `admin::Admin`) owns its state; this file
//! only opens them on one database and serves them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::{IncomingStream, Listener};

use dunite_core::{Database, DatabaseOptions};

use crate::admin::Admin;
use crate::auth::{self, Area, ClientAuth};
use crate::config::Config;
use crate::dl::Proxy;
use crate::limits::FillLimits;
use crate::metrics::{CacheGauges, CacheOutcome, Metrics};
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
    /// Counters, shared with the features.
    metrics: Arc<Metrics>,
    /// Client authentication and grants per area.
    auth: Arc<ClientAuth>,
    /// The fill limits (shared with the features).
    limits: Arc<FillLimits>,
    /// The admin API (`/admin/`), over the other features' caches.
    admin: Arc<Admin>,
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
        for warning in config.exposure_warnings() {
            tracing::warn!("{warning}");
        }
        let auth = Arc::new(ClientAuth::load(&config.auth)?);
        let metrics = Arc::new(Metrics::default());
        let limits = Arc::new(FillLimits::new(config.max_fills, config.max_fills_per_client));
        let mirror = Mirror::open(&config, &database, Arc::clone(&metrics), Arc::clone(&limits)).await?;
        let proxy = Proxy::open(&config, &database, Arc::clone(&metrics), Arc::clone(&limits)).await?;
        let (mirror, proxy) = (Arc::new(mirror), Arc::new(proxy));
        let admin = Arc::new(Admin::new(Arc::clone(&mirror), Arc::clone(&proxy)));
        Ok(Arc::new(Self { config, mirror, proxy, metrics, auth, limits, admin }))
    }

    /// The routes: each feature's and `/metrics`, each behind its area's access check, and
    /// `/healthz` (open to all), all behind the request log.
    pub fn router(self: &Arc<Self>) -> Router {
        let guarded = |router: Router, area: Area| {
            router.route_layer(middleware::from_fn_with_state((Arc::clone(&self.auth), area), auth::guard))
        };
        let metrics_route = Router::new().route("/metrics", get(metrics)).with_state(Arc::clone(self));
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .merge(guarded(metrics_route, Area::Metrics))
            .merge(guarded(self.mirror.routes(), Area::Pull))
            .merge(guarded(self.proxy.routes(), Area::Download))
            .merge(guarded(self.admin.routes(), Area::Admin))
            .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
            .layer(middleware::from_fn_with_state(Arc::clone(&self.metrics), log_request))
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
    for (name, cache) in app.mirror.caches().into_iter().chain(app.proxy.caches()) {
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
    ([("content-type", "text/plain; version=0.0.4")], app.metrics.render(&caches, app.limits.in_flight()))
        .into_response()
}

/// One info line per request: method, path, status, bytes, cache outcome, duration.
async fn log_request(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    // The path only: query strings may carry what does not belong in logs.
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    metrics.requests.fetch_add(1, Ordering::Relaxed);
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
