//! The OCI distribution pull API, as a pull-through mirror: [`Mirror`] owns the blob,
//! manifest and tag caches, the upstream registries and their fills, and serves `/v2/`.
//!
//! One concept per file: `blobs.rs` (hits, ranges, streamed fills, remembered `HEAD`s),
//! `manifests.rs` (by digest and by tag, with the stale fallback), `listings.rs` (tag lists
//! and referrers), `accept.rs` (a client's `Accept` as the tag cache keys it), `error.rs`
//! (every failure and its one mapping to the spec's JSON errors), `passthrough.rs`
//! (`--pass-through-auth`), `remembered.rs` (upstream answers kept in memory, bounded).
//!
//! A stale answer (a tag's, a listing's) stands in for the upstream's when the upstream does
//! not answer usefully (`Error::stale_reason`: unreachable, timed out, a 5xx, a 429) and the
//! answer is no older than `--tag-max-stale` (`Mirror::may_stand_in`).

mod accept;
mod blobs;
mod error;
mod listings;
mod manifests;
mod passthrough;
mod prefetch;
mod remembered;

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

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
use error::StaleReason;
#[cfg(feature = "fuzzing")]
pub(crate) use listings::{link, next_query};
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
    /// The oldest answer that may stand in for an upstream that does not answer.
    tag_max_stale: Duration,
    /// Sizes of blobs not cached, from the upstream's answers to `HEAD`, for the tag TTL.
    blob_heads: remembered::Remembered<(String, String, Digest), Option<u64>>,
}

/// The most blob `HEAD` answers remembered (about 200 bytes each).
const MAX_BLOB_HEADS: usize = 16_384;

/// What a stale answer stood in for, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stale {
    /// A tag's manifest.
    Tag,
    /// A tag list or referrers list.
    Listing,
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
        .with_fill_options(
            FillOptions::new()
                .with_idle_timeout(config.upstream_timeout)
                .with_lease_timeout(config.fill_lease_timeout),
        );
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
            tag_max_stale: config.tag_max_stale,
            blob_heads: remembered::Remembered::new(config.tag_ttl, MAX_BLOB_HEADS),
        })
    }

    /// Why an answer `age` old may be served instead of the upstream's, which failed with
    /// `error`: if the error is an outage of the upstream's ([`Error::stale_reason`]) and the
    /// answer is no older than `--tag-max-stale`.
    fn may_stand_in(&self, error: &Error, age: Duration) -> Option<StaleReason> {
        error.stale_reason().filter(|_| age <= self.tag_max_stale)
    }

    /// Count (and log) a stale answer served for `what` because of `error`.
    fn served_stale(&self, reason: StaleReason, stale: Stale, what: &str, error: &Error) {
        let message = crate::error_chain(error);
        tracing::warn!(what, error = %message, "upstream did not answer; serving the cached answer");
        match stale {
            Stale::Tag => self.metrics.stale_tag_served(),
            Stale::Listing => self.metrics.stale_listing_served(),
        }
        if reason == StaleReason::RateLimited {
            self.metrics.stale_rate_limited();
        }
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
            (blobs::CACHE, self.blobs.entries()),
            (manifests::CACHE, self.manifests.entries()),
            ("tags", self.tags.entries()),
        ]
    }

    /// Fills running now, for the caches that fill by key (`/metrics`).
    pub(crate) fn fills_in_flight(&self) -> [(&'static str, usize); 2] {
        [(blobs::CACHE, self.blobs.fills_in_flight()), (manifests::CACHE, self.manifests.fills_in_flight())]
    }
}

/// `GET /v2/`.
async fn root() -> Response {
    ([("docker-distribution-api-version", "registry/2.0"), ("content-type", "application/json")], "{}")
        .into_response()
}

/// `GET|HEAD /v2/<name>/manifests/<reference>`, `/v2/<name>/blobs/<digest>`,
/// `/v2/<name>/tags/list` and `/v2/<name>/referrers/<digest>`.
async fn dispatch(
    State(mirror): State<Arc<Mirror>>,
    method: Method,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
    peer: Peer,
    login: Option<Extension<UpstreamLogin>>,
    headers: HeaderMap,
) -> Response {
    let client = Client { peer, login: login.map(|Extension(login)| login) };
    let query = query.unwrap_or_default();
    match route(&mirror, &method, &rest, &query, &client, &headers).await {
        Ok(response) => response,
        Err(error) => {
            mirror.metrics.failed(error.status(), error.is_fill_limit());
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
    query: &str,
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
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    // `?ns=<registry host>`, as containerd sends it to a mirror.
    let ns = pairs.iter().find(|(key, _)| key == "ns").map(|(_, host)| host.as_str());
    let host = ns.map_or_else(|| mirror.default_registry.clone(), str::to_owned);
    if !mirror.registries.knows(&host) {
        return Err(Error::UnknownRegistry(host));
    }
    // Read what is asked for before anything is authorised or fetched.
    let asked = match (kind, reference) {
        ("blobs", digest) => Asked::Blob(digest.parse().map_err(Error::DigestInvalid)?),
        ("manifests", reference) => Asked::Manifest(Reference::parse(reference)?),
        ("tags", "list") => Asked::Listing(listings::Kind::Tags),
        ("referrers", digest) => {
            Asked::Listing(listings::Kind::Referrers(digest.parse().map_err(Error::DigestInvalid)?))
        }
        _ => return Err(Error::UnknownEndpoint),
    };
    if let Some(checks) = &mirror.pass_through {
        let anonymous = UpstreamLogin(None);
        let login = client.login.as_ref().unwrap_or(&anonymous);
        passthrough::authorise(mirror, checks, (&host, name), (login, client.peer), &asked).await?;
    }
    let peer = client.peer;
    match asked {
        Asked::Listing(listing) => {
            let query = listings::upstream_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
            listings::listing(mirror, method, (&host, name), (listing, &query), ns, peer).await
        }
        Asked::Blob(digest) => blobs::blob(mirror, method, (&host, name), &digest, peer, headers).await,
        Asked::Manifest(reference) => {
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
    }
}

/// What a `/v2/` request asks for.
#[derive(Debug)]
enum Asked {
    /// `blobs/<digest>`.
    Blob(Digest),
    /// `manifests/<tag or digest>`.
    Manifest(Reference),
    /// `tags/list` or `referrers/<digest>`.
    Listing(listings::Kind),
}

fn set_digest(headers: &mut HeaderMap, digest: &Digest) {
    headers.insert("docker-content-digest", header_value(&digest.to_string()));
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
