//! The OCI distribution pull API, as a pull-through mirror: [`Mirror`] owns the blob,
//! manifest and tag caches, the upstream registries and their fills, and serves `/v2/`.
//!
//! One concept per file: `blobs.rs` (hits, ranges, streamed fills), `manifests.rs` (by digest
//! and by tag, with the stale fallback), `accept.rs` (a client's `Accept` as the tag cache
//! keys it), `error.rs` (every failure and its one mapping to the spec's JSON errors).

mod accept;
mod blobs;
mod error;
mod manifests;
mod passthrough;
mod prefetch;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde::Deserialize;

use dunite_core::{Database, EntryCache, EvictionPolicy, FillOptions};
use dunite_oci::{BlobCache, Digest, ManifestCache, TagCache};

use crate::auth::UpstreamLogin;
use crate::config::Config;
use crate::limits::FillLimits;
use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::spec::{Reference, is_valid_name};
use crate::start::StartError;
use crate::upstream::Registries;

// For the parser checks of `dunite::fuzzing`.
#[cfg(feature = "fuzzing")]
pub(crate) use accept::{accepted_types, upstream_accept};
#[cfg(feature = "fuzzing")]
pub(crate) use blobs::parse_range;
pub(crate) use error::Error;
pub(crate) use prefetch::{Platform, PrefetchProgress};

/// The pull-through mirror's state: its caches (with their fills) and its upstreams.
#[derive(Debug)]
pub(crate) struct Mirror {
    /// OCI blobs by digest.
    blobs: BlobCache,
    /// OCI manifests by digest, with their media type.
    manifests: ManifestCache,
    /// Tag -> digest records.
    tags: TagCache,
    /// Upstream registries.
    registries: Registries,
    /// The registry of requests without `?ns=`.
    default_registry: String,
    /// The server's counters.
    metrics: Arc<Metrics>,
    /// The limits on concurrent fills (shared with the download proxy).
    limits: Arc<FillLimits>,
    /// With `--pass-through-auth`: the upstream's remembered answers.
    pass_through: Option<passthrough::PassThrough>,
}

/// `?ns=<registry host>`, as containerd sends it to a mirror.
#[derive(Debug, Deserialize)]
struct NsQuery {
    ns: Option<String>,
}

impl Mirror {
    /// Open the mirror's caches on `database` (under `config.data_dir`) and its upstream
    /// client. Requires a Tokio runtime.
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
        let dir = &config.data_dir;
        let blobs = BlobCache::new(
            BlobCache::options(dir.join("blobs"), EvictionPolicy::new(config.oci_max_bytes))
                .with_database(database.clone()),
        )
        .await?
        .with_fill_options(FillOptions::new().with_idle_timeout(config.upstream_timeout));
        let manifest_cap = (config.oci_max_bytes / 16).max(64 << 20);
        let tags = TagCache::new(
            TagCache::options(dir.join("tags"), EvictionPolicy::new(config.tag_max_bytes))
                .with_database(database.clone()),
            config.tag_ttl,
        )
        .await?;
        let manifests = ManifestCache::new(
            ManifestCache::options(dir.join("manifests"), EvictionPolicy::new(manifest_cap))
                .with_database(database.clone()),
        )
        .await?
        .with_fill_options(FillOptions::new().with_idle_timeout(config.upstream_timeout))
        .with_tag_records(tags.clone());
        let registries = Registries::new(config)?;
        Ok(Self {
            blobs,
            manifests,
            tags,
            registries,
            default_registry: config.default_registry.clone(),
            metrics,
            limits,
            pass_through: config
                .auth
                .pass_through
                .then(|| passthrough::PassThrough::new(config.pass_through_ttl)),
        })
    }

    /// `/v2/` and everything under it, with the mirror as state.
    pub(crate) fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v2/", get(root))
            .route("/v2", get(root))
            // Every method reaches the dispatcher, which answers non-pulls with the spec error.
            .route("/v2/{*rest}", any(dispatch))
            .with_state(Arc::clone(self))
    }

    /// The caches, by the name `/metrics` shows.
    pub(crate) fn caches(&self) -> [(&'static str, &EntryCache); 3] {
        [
            ("blobs", self.blobs.entries()),
            ("manifests", self.manifests.entries()),
            ("tags", self.tags.entries()),
        ]
    }
}

/// `GET /v2/`.
async fn root() -> Response {
    ([("docker-distribution-api-version", "registry/2.0"), ("content-type", "application/json")], "{}")
        .into_response()
}

/// `GET|HEAD /v2/<name>/manifests/<reference>` and `/v2/<name>/blobs/<digest>`.
async fn dispatch(
    State(mirror): State<Arc<Mirror>>,
    method: Method,
    Path(rest): Path<String>,
    Query(query): Query<NsQuery>,
    peer: Peer,
    login: Option<Extension<UpstreamLogin>>,
    headers: HeaderMap,
) -> Response {
    let client = Client { peer, login: login.map(|Extension(login)| login) };
    match route(&mirror, &method, &rest, query, &client, &headers).await {
        Ok(response) => response,
        Err(error) => {
            let status = error.status();
            if status.is_server_error() {
                mirror.metrics.errors.fetch_add(1, Ordering::Relaxed);
            } else if status == axum::http::StatusCode::TOO_MANY_REQUESTS {
                mirror.metrics.fills_refused.fetch_add(1, Ordering::Relaxed);
            }
            error.into_response()
        }
    }
}

/// Who is asking: the connection's address (for the fill limits) and, with
/// `--pass-through-auth`, the upstream credentials the client sent.
#[derive(Debug)]
struct Client {
    peer: Peer,
    login: Option<UpstreamLogin>,
}

async fn route(
    mirror: &Arc<Mirror>,
    method: &Method,
    rest: &str,
    query: NsQuery,
    client: &Client,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    if *method != Method::GET && *method != Method::HEAD {
        return Err(Error::NotAPull);
    }
    let mut parts = rest.rsplitn(3, '/');
    let (reference, kind, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(r), Some(k), Some(n)) => (r, k, n),
        _ => return Err(Error::UnknownEndpoint),
    };
    if !is_valid_name(name) {
        return Err(Error::NameInvalid);
    }
    let host = query.ns.unwrap_or_else(|| mirror.default_registry.clone());
    if !mirror.registries.knows(&host) {
        return Err(Error::UnknownRegistry(host));
    }
    if !matches!(kind, "blobs" | "manifests") {
        return Err(Error::UnknownEndpoint);
    }
    if let Some(checks) = &mirror.pass_through {
        let anonymous = UpstreamLogin(None);
        passthrough::authorise(mirror, checks, &host, name, client.login.as_ref().unwrap_or(&anonymous))
            .await?;
    }
    let peer = client.peer;
    match kind {
        "blobs" => {
            let digest: Digest = reference.parse().map_err(Error::DigestInvalid)?;
            blobs::blob(mirror, method, (&host, name), &digest, peer, headers).await
        }
        "manifests" => {
            let reference = Reference::parse(reference)?;
            let response =
                manifests::manifest(mirror, method, (&host, name), reference, peer, headers).await?;
            // Usage per repository (`/admin/usage`): the manifest served, by its digest.
            if let Some(digest) =
                response.headers().get("docker-content-digest").and_then(|v| v.to_str().ok())
            {
                mirror.manifests.entries().entries().record_origin(digest, &format!("{host}/{name}"));
            }
            Ok(response)
        }
        _ => Err(Error::UnknownEndpoint),
    }
}

fn set_digest(headers: &mut HeaderMap, digest: &Digest) {
    headers.insert("docker-content-digest", header_value(&digest.to_string()));
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
