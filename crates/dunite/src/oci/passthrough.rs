//! Pass-through authorisation (`--pass-through-auth`): before a client is served anything of
//! a repository, the upstream is asked whether the client's own credentials may pull it
//! (`Registries::may_pull`). Answers are remembered per credential and repository for
//! `--pass-through-ttl`, so a pull of many blobs costs one check. Nobody gets from the cache
//! what the upstream would refuse them.
//!
//! The caches are shared by digest across repositories, so access to a repository is not
//! enough to be served a digest: the digest must be the repository's. Before a blob or a
//! manifest by digest is served (a hit, or a fill joined), the upstream is asked (`HEAD`, with
//! the mirror's credentials) whether the repository holds it, and the answer is remembered
//! for [`MEMBERSHIP_TTL`]: a client allowed to pull `public/app` cannot read a layer cached
//! through `private/app` by naming its digest.

use std::time::Duration;

use axum::http::{HeaderValue, Method, StatusCode};

use super::remembered::Remembered;
use super::{Asked, Error, Mirror};
use crate::auth::UpstreamLogin;
use crate::config::Credentials;
use crate::peer::Peer;
use crate::spec::Reference;

/// The most answers remembered (credentials x repositories, which clients choose), and the
/// most digest memberships.
const MAX_ANSWERS: usize = 8192;
const MAX_MEMBERS: usize = 65_536;
/// How long a repository's holding of a digest is remembered (contents by digest do not
/// change; a repository rarely drops one).
pub(super) const MEMBERSHIP_TTL: Duration = Duration::from_secs(24 * 3600);

/// Whose access to what: (digest of the credentials, registry, repository).
type Key = ([u8; 32], String, String);

/// Remembered answers: who -> may pull, for `--pass-through-ttl`.
#[derive(Debug)]
pub(super) struct PassThrough {
    answers: Remembered<Key, bool>,
    /// (registry, repository as upstream names it, digest) known to be the repository's.
    members: Remembered<(String, String, String), ()>,
}

impl PassThrough {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            answers: Remembered::new(ttl, MAX_ANSWERS),
            members: Remembered::new(MEMBERSHIP_TTL, MAX_MEMBERS),
        }
    }
}

/// Let `login` pull `asked` from `name` on `host`, or say why not: [`Error::LoginRequired`]
/// without credentials (the client may then log in), [`Error::Denied`] with credentials the
/// upstream refuses, [`Error::BlobUnknown`] / [`Error::ManifestUnknown`] for a digest the
/// repository does not hold upstream. An upstream that cannot be asked grants nothing.
pub(super) async fn authorise(
    mirror: &Mirror,
    checks: &PassThrough,
    (host, name): (&str, &str),
    (login, peer): (&UpstreamLogin, Peer),
    asked: &Asked,
) -> Result<(), Error> {
    let credentials = login.0.as_ref().map(|(username, password)| Credentials {
        username: username.clone(),
        password: password.clone(),
        realms: None,
    });
    let digest = credentials.as_ref().map_or([0; 32], |c| crate::auth::pair_digest(&c.username, &c.password));
    let upstream_name = mirror.registries.upstream_name(host, name);
    let key = (digest, host.to_owned(), upstream_name.clone());
    let may = match checks.answers.get(&key) {
        Some(may) => may,
        None => {
            // Asking the upstream counts like a fill: a client cannot make the mirror ask it
            // without bound (each new credential is a check).
            let _permit = mirror.limits.try_start(peer.ip())?;
            let may = mirror.registries.may_pull(host, &upstream_name, credentials.as_ref()).await?;
            checks.answers.insert(key, may);
            may
        }
    };
    match (may, &credentials) {
        (true, _) => {}
        (false, None) => return Err(Error::LoginRequired),
        (false, Some(_)) => return Err(Error::Denied),
    }
    let (kind, digest, unknown) = match asked {
        Asked::Blob(digest) => ("blobs", digest, Error::BlobUnknown),
        Asked::Manifest(Reference::Digest(digest)) => ("manifests", digest, Error::ManifestUnknown),
        // A tag is resolved in this repository, upstream or in its own records.
        Asked::Manifest(Reference::Tag(_)) | Asked::Listing(_) => return Ok(()),
    };
    let member = (host.to_owned(), upstream_name.clone(), digest.to_string());
    if checks.members.get(&member).is_some() {
        return Ok(());
    }
    let path = format!("{upstream_name}/{kind}/{digest}");
    let every_type = HeaderValue::from_static(super::manifests::EVERY_MANIFEST_TYPE);
    let accept = (kind == "manifests").then_some(&every_type);
    let _permit = mirror.limits.try_start(peer.ip())?;
    let head = mirror.registries.send(host, &upstream_name, Method::HEAD, &path, accept);
    let answer = mirror.metrics.upstream(head).await?;
    match answer.status() {
        status if status.is_success() => {
            checks.members.insert(member, ());
            Ok(())
        }
        StatusCode::NOT_FOUND => Err(unknown),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Error::Denied),
        status => Err(Error::UpstreamStatus(status)),
    }
}
