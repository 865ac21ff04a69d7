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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::Digest as _;

use axum::http::{HeaderValue, Method, StatusCode};

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

/// Remembered answers: who -> (may pull, until when).
#[derive(Debug)]
pub(super) struct PassThrough {
    ttl: Duration,
    answers: Mutex<HashMap<Key, (bool, Instant)>>,
    /// (registry, repository as upstream names it, digest) -> until when it is known to be
    /// the repository's.
    members: Mutex<HashMap<(String, String, String), Instant>>,
}

impl PassThrough {
    pub(super) fn new(ttl: Duration) -> Self {
        Self { ttl, answers: Mutex::default(), members: Mutex::default() }
    }

    fn remembered(&self, key: &Key) -> Option<bool> {
        let answers = self.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        answers.get(key).filter(|(_, until)| *until > Instant::now()).map(|(may, _)| *may)
    }

    fn remember(&self, key: Key, may: bool) {
        let mut answers = self.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        insert_bounded(&mut answers, key, (may, Instant::now() + self.ttl), MAX_ANSWERS, |(_, until)| *until);
    }

    fn is_member(&self, key: &(String, String, String)) -> bool {
        let members = self.members.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        members.get(key).is_some_and(|until| *until > Instant::now())
    }

    fn remember_member(&self, key: (String, String, String)) {
        let mut members = self.members.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        insert_bounded(&mut members, key, Instant::now() + MEMBERSHIP_TTL, MAX_MEMBERS, |until| *until);
    }
}

/// Insert into a map of answers that expire: expired ones are dropped first when it is full,
/// then the one expiring soonest.
fn insert_bounded<K, V>(map: &mut HashMap<K, V>, key: K, value: V, max: usize, until: impl Fn(&V) -> Instant)
where
    K: std::hash::Hash + Eq + Clone,
{
    if map.len() >= max {
        let now = Instant::now();
        map.retain(|_, v| until(v) > now);
    }
    if map.len() >= max
        && let Some(soonest) = map.iter().min_by_key(|(_, v)| until(v)).map(|(k, _)| k.clone())
    {
        map.remove(&soonest);
    }
    map.insert(key, value);
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
    let digest: [u8; 32] = match &credentials {
        Some(c) => {
            let mut hasher = sha2::Sha256::new();
            hasher.update(c.username.as_bytes());
            hasher.update([0]);
            hasher.update(c.password.as_bytes());
            hasher.finalize().into()
        }
        None => [0; 32],
    };
    let upstream_name = mirror.registries.upstream_name(host, name);
    let key = (digest, host.to_owned(), upstream_name.clone());
    let may = match checks.remembered(&key) {
        Some(may) => may,
        None => {
            // Asking the upstream counts like a fill: a client cannot make the mirror ask it
            // without bound (each new credential is a check).
            let _permit = mirror.limits.try_start(peer.ip())?;
            let may = mirror.registries.may_pull(host, &upstream_name, credentials.as_ref()).await?;
            checks.remember(key, may);
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
        Asked::Manifest(Reference::Tag(_)) => return Ok(()),
    };
    let member = (host.to_owned(), upstream_name.clone(), digest.to_string());
    if checks.is_member(&member) {
        return Ok(());
    }
    let path = format!("{upstream_name}/{kind}/{digest}");
    let every_type = HeaderValue::from_static(super::manifests::EVERY_MANIFEST_TYPE);
    let accept = (kind == "manifests").then_some(&every_type);
    let _permit = mirror.limits.try_start(peer.ip())?;
    let answer = mirror.registries.send(host, &upstream_name, Method::HEAD, &path, accept).await?;
    match answer.status() {
        status if status.is_success() => {
            checks.remember_member(member);
            Ok(())
        }
        StatusCode::NOT_FOUND => Err(unknown),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Error::Denied),
        status => Err(Error::UpstreamStatus(status)),
    }
}
