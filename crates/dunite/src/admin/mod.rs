//! The admin API under `/admin/`: operators see and steer the caches. `Admin` owns what it
//! adds (the prefetch jobs) and reaches the caches through the features that own them
//! (`oci::Mirror`, `dl::Proxy`). JSON in and out; the types are [`api`]'s, shared with
//! `dunite admin`.
//!
//! One concept per file: `api.rs` (the JSON), `error.rs` (failures and their one mapping to
//! HTTP), `jobs.rs` (prefetch jobs). The app guards these routes with `Area::Admin`.

pub mod api;
mod error;
mod jobs;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use dunite_core::{EntryCache, ListOrder, ListQuery, Pinning};

use self::api::{
    CacheSummary, Caches, Entries, Entry, Pinned, PrefetchRequest, Purged, Removed, RepositoryUsage, Target,
    Usage,
};
use self::error::Error;
use self::jobs::Jobs;
use crate::dl::Proxy;
use crate::oci::{Mirror, Platform};

/// The caches whose entries are recorded per repository.
const BY_REPOSITORY: [&str; 2] = ["blobs", "manifests"];

/// The admin API's state.
#[derive(Debug)]
pub(crate) struct Admin {
    mirror: Arc<Mirror>,
    proxy: Arc<Proxy>,
    jobs: Jobs,
}

/// `GET /admin/caches/{cache}/entries` query.
#[derive(Debug, Deserialize)]
struct ListParams {
    order: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

impl Admin {
    pub(crate) fn new(mirror: Arc<Mirror>, proxy: Arc<Proxy>) -> Self {
        Self { mirror, proxy, jobs: Jobs::default() }
    }

    /// `/admin/...`, with the admin as state.
    pub(crate) fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/admin/caches", get(caches))
            .route("/admin/caches/{cache}/entries", get(entries))
            .route("/admin/usage", get(usage))
            .route("/admin/purge", post(purge))
            .route("/admin/pin", post(pin))
            .route("/admin/unpin", post(unpin))
            .route("/admin/prefetch", post(prefetch))
            .route("/admin/prefetch/{id}", get(prefetch_job))
            .with_state(Arc::clone(self))
    }

    fn caches(&self) -> impl Iterator<Item = (&'static str, &EntryCache)> {
        self.mirror.caches().into_iter().chain(self.proxy.caches())
    }

    fn cache(&self, name: &str) -> Result<&EntryCache, Error> {
        self.caches()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c)
            .ok_or_else(|| Error::UnknownCache(name.to_owned()))
    }
}

async fn caches(State(admin): State<Arc<Admin>>) -> Result<Json<Caches>, Error> {
    let mut caches = Vec::new();
    for (name, cache) in admin.caches() {
        caches.push(CacheSummary {
            name: name.to_owned(),
            bytes: cache.total_bytes().await?,
            max_bytes: cache.evictor().policy().max_bytes(),
            entries: cache.len().await?,
            pinned_bytes: cache.entries().pinned_bytes().await?,
        });
    }
    Ok(Json(Caches { caches }))
}

async fn entries(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<Entries>, Error> {
    let cache = admin.cache(&name)?;
    let order = match params.order.as_deref() {
        None | Some("recent") => ListOrder::Recent,
        Some("size") => ListOrder::Size,
        Some(other) => return Err(Error::BadRequest(format!("order {other:?} is not `recent` or `size`"))),
    };
    let mut query = ListQuery::new(order, params.limit.unwrap_or(50));
    if let Some(cursor) = params.cursor {
        query = query.after(cursor);
    }
    let page = cache.entries().list(&query).await?;
    let entries = page
        .entries
        .into_iter()
        .map(|e| Entry {
            key: shown_key(&e.key),
            size: e.size,
            last_used_ms: e.last_used_us / 1000,
            stored_at_ms: e.stored_at_ms,
            pinned: e.pinned,
        })
        .collect();
    Ok(Json(Entries { cache: name, entries, next: page.next }))
}

/// An entry's key as answers and logs show it: a download's URL without its query or
/// credentials (`UrlKey::redacted`: pre-signed URLs and tokens stay out of admin output),
/// anything else as it is. (A page's `next` cursor is the key itself, to be handed back.)
fn shown_key(key: &str) -> String {
    match dunite_download::UrlKey::parse(key) {
        Ok(url) if key.starts_with("http://") || key.starts_with("https://") => url.redacted(),
        _ => key.to_owned(),
    }
}

async fn usage(State(admin): State<Arc<Admin>>) -> Result<Json<Usage>, Error> {
    let mut by_repository: std::collections::BTreeMap<String, RepositoryUsage> = Default::default();
    for name in BY_REPOSITORY {
        for usage in admin.cache(name)?.entries().usage_by_origin().await? {
            let entry = by_repository.entry(usage.origin.clone()).or_insert_with(|| RepositoryUsage {
                repository: usage.origin.clone(),
                bytes: 0,
                entries: 0,
                exclusive_bytes: 0,
            });
            entry.bytes += usage.bytes;
            entry.entries += usage.entries;
            entry.exclusive_bytes += usage.exclusive_bytes;
        }
    }
    let mut repositories: Vec<_> = by_repository.into_values().collect();
    repositories.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.repository.cmp(&b.repository)));
    Ok(Json(Usage {
        repositories,
        note: "blobs and manifests shared by several repositories are counted in full for each \
               (so the sum may exceed the caches' total); exclusive_bytes counts only what no other \
               repository pulled"
            .to_owned(),
    }))
}

/// What a purge or pin names, checked: exactly one of its fields.
enum Named {
    Digest(String),
    Repository(String),
    Url(dunite_download::UrlKey),
}

fn named(target: Target) -> Result<Named, Error> {
    match (target.digest, target.repository, target.url) {
        (Some(digest), None, None) => {
            let digest: dunite_oci::Digest =
                digest.parse().map_err(|e| Error::BadRequest(format!("digest {digest:?}: {e}")))?;
            Ok(Named::Digest(digest.to_string()))
        }
        (None, Some(repository), None) => Ok(Named::Repository(repository)),
        (None, None, Some(url)) => dunite_download::UrlKey::parse(&url)
            .map(Named::Url)
            .map_err(|e| Error::BadRequest(crate::error_chain(&e))),
        _ => Err(Error::BadRequest("name exactly one of digest, repository and url".to_owned())),
    }
}

async fn purge(State(admin): State<Arc<Admin>>, Json(target): Json<Target>) -> Result<Json<Purged>, Error> {
    let mut purged = Purged::default();
    let mut remove = async |cache: &'static str, key: &str| -> Result<(), Error> {
        if let Some(bytes) = admin.cache(cache)?.remove(key).await? {
            // A download's key is its URL, whose query may hold a token: shown without it.
            let shown = shown_key(key);
            tracing::info!(cache, key = shown, bytes, "purged");
            purged.removed.push(Removed { cache: cache.to_owned(), key: shown, bytes });
        }
        Ok(())
    };
    let what = match named(target)? {
        Named::Digest(digest) => {
            for cache in BY_REPOSITORY {
                remove(cache, &digest).await?;
            }
            digest
        }
        Named::Url(url) => {
            remove("downloads", url.as_str()).await?;
            url.redacted().to_string()
        }
        Named::Repository(repository) => {
            let mut shared_kept = Vec::new();
            for cache in BY_REPOSITORY {
                let (only, shared) = admin.cache(cache)?.entries().keys_of_origin(&repository).await?;
                for key in only {
                    remove(cache, &key).await?;
                }
                shared_kept.extend(shared);
            }
            purged.shared_kept = shared_kept;
            repository
        }
    };
    if purged.removed.is_empty() && purged.shared_kept.is_empty() {
        return Err(Error::NotFound(format!("nothing cached for {what}")));
    }
    Ok(Json(purged))
}

async fn pin(State(admin): State<Arc<Admin>>, Json(target): Json<Target>) -> Result<Json<Pinned>, Error> {
    set_pinned(&admin, target, Pinning::Pin).await
}

async fn unpin(State(admin): State<Arc<Admin>>, Json(target): Json<Target>) -> Result<Json<Pinned>, Error> {
    set_pinned(&admin, target, Pinning::Unpin).await
}

async fn set_pinned(admin: &Admin, target: Target, pinning: Pinning) -> Result<Json<Pinned>, Error> {
    let (candidates, key, shown): (&[&'static str], String, String) = match named(target)? {
        Named::Digest(digest) => (&BY_REPOSITORY, digest.clone(), digest),
        Named::Url(url) => (&["downloads"], url.as_str().to_owned(), url.redacted().to_string()),
        Named::Repository(_) => return Err(Error::BadRequest("pin a digest or a url".to_owned())),
    };
    for &cache in candidates {
        if let Some(size) = admin.cache(cache)?.entries().set_pinned(&key, pinning).await? {
            let pinned = pinning == Pinning::Pin;
            tracing::info!(cache, key = shown, pinned, "pin changed");
            return Ok(Json(Pinned { cache: cache.to_owned(), key: shown, size, pinned }));
        }
    }
    Err(Error::NotFound(format!("nothing cached for {shown}")))
}

async fn prefetch(
    State(admin): State<Arc<Admin>>,
    Json(request): Json<PrefetchRequest>,
) -> Result<Response, Error> {
    let platform: Platform =
        request.platform.as_deref().unwrap_or("linux/amd64").parse().map_err(Error::BadRequest)?;
    let image = admin
        .mirror
        .parse_image(&request.image)
        .map_err(|e| Error::BadRequest(format!("image {:?}: {}", request.image, crate::error_chain(&e))))?;
    let job = admin.jobs.start(&admin.mirror, request.image, image, platform)?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn prefetch_job(State(admin): State<Arc<Admin>>, Path(id): Path<u64>) -> Result<Response, Error> {
    let job = admin.jobs.get(id).ok_or_else(|| Error::NotFound(format!("no prefetch job {id}")))?;
    Ok(Json(job).into_response())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::{Request, StatusCode, header};
    use tower::ServiceExt as _;

    use crate::auth::Grants;
    use crate::peer::PeerAddr;
    use crate::{App, Config};

    async fn status(app: &std::sync::Arc<App>, from: Option<SocketAddr>, token: Option<&str>) -> StatusCode {
        status_with(app, from, token, &[]).await
    }

    async fn status_with(
        app: &std::sync::Arc<App>,
        from: Option<SocketAddr>,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> StatusCode {
        let mut request = Request::get("/admin/caches");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let mut request = request.body(Body::empty()).unwrap();
        if let Some(addr) = from {
            request.extensions_mut().insert(ConnectInfo(PeerAddr::from(addr)));
        }
        app.router().oneshot(request).await.unwrap().status()
    }

    /// Without client authentication, `/admin/` answers loopback clients only: a request
    /// with no address (or another address) is refused.
    #[tokio::test]
    async fn without_client_auth_the_admin_api_is_loopback_only() {
        let dir = tempfile::tempdir().unwrap();
        let app = App::open(Config::new(dir.path().join("data"))).await.unwrap();
        assert_eq!(status(&app, None, None).await, StatusCode::FORBIDDEN);
        assert_eq!(
            status(&app, Some(SocketAddr::from(([192, 0, 2, 7], 4000))), None).await,
            StatusCode::FORBIDDEN
        );
        let loopback = Some(SocketAddr::from(([127, 0, 0, 1], 4000)));
        assert_eq!(status(&app, loopback, None).await, StatusCode::OK);
        assert_eq!(status_with(&app, loopback, None, &[("host", "127.0.0.1:5080")]).await, StatusCode::OK);
        assert_eq!(status_with(&app, loopback, None, &[("host", "localhost")]).await, StatusCode::OK);
        // A reverse proxy on this host relays everyone's requests from loopback; a browser
        // led by DNS rebinding sends its page's host name.
        for relayed in
            [("x-forwarded-for", "203.0.113.9"), ("forwarded", "for=203.0.113.9"), ("host", "evil.example")]
        {
            assert_eq!(
                status_with(&app, loopback, None, &[relayed]).await,
                StatusCode::FORBIDDEN,
                "{relayed:?}"
            );
        }
    }

    /// With client authentication, `--access admin=ops` lets `ops` in from anywhere; another
    /// authenticated client gets 403, no credentials 401.
    #[tokio::test]
    async fn with_client_auth_only_the_granted_user_is_let_in() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "ops:ops-token-0123456789abcdef\nbob:bob-token-0123456789abcdef\n").unwrap();
        let mut config = Config::new(dir.path().join("data"));
        config.auth.token_file = Some(tokens);
        let mut grants = Grants::default();
        grants.add("admin=ops").unwrap();
        config.auth.grants = grants;
        let app = App::open(config).await.unwrap();
        assert_eq!(status(&app, None, Some("ops-token-0123456789abcdef")).await, StatusCode::OK);
        assert_eq!(status(&app, None, Some("bob-token-0123456789abcdef")).await, StatusCode::FORBIDDEN);
        assert_eq!(status(&app, None, None).await, StatusCode::UNAUTHORIZED);
        let loopback = Some(SocketAddr::from(([127, 0, 0, 1], 4000)));
        assert_eq!(status(&app, loopback, Some("bob-token-0123456789abcdef")).await, StatusCode::FORBIDDEN);
    }
}
