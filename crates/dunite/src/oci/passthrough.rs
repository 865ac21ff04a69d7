//! Pass-through authorisation (`--pass-through-auth`): before a client is served anything of
//! a repository, the upstream is asked whether the client's own credentials may pull it
//! (`Registries::may_pull`). Answers are remembered per credential and repository for
//! `--pass-through-ttl`, so a pull of many blobs costs one check. Nobody gets from the cache
//! what the upstream would refuse them.

use std::time::Duration;

use sha2::Digest as _;

use super::remembered::Remembered;
use super::{Error, Mirror};
use crate::auth::UpstreamLogin;
use crate::config::Credentials;

/// The most answers remembered (credentials x repositories, which clients choose).
const MAX_ANSWERS: usize = 8192;

/// Whose access to what: (digest of the credentials, registry, repository).
type Key = ([u8; 32], String, String);

/// Remembered answers: who -> may pull, for `--pass-through-ttl`.
#[derive(Debug)]
pub(super) struct PassThrough {
    answers: Remembered<Key, bool>,
}

impl PassThrough {
    pub(super) fn new(ttl: Duration) -> Self {
        Self { answers: Remembered::new(ttl, MAX_ANSWERS) }
    }
}

/// Let `login` pull `name` from `host`, or say why not: [`Error::LoginRequired`] without
/// credentials (the client may then log in), [`Error::Denied`] with credentials the upstream
/// refuses. An upstream that cannot be asked grants nothing.
pub(super) async fn authorise(
    mirror: &Mirror,
    checks: &PassThrough,
    host: &str,
    name: &str,
    login: &UpstreamLogin,
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
    let may = match checks.answers.get(&key) {
        Some(may) => may,
        None => {
            let may = mirror.registries.may_pull(host, &upstream_name, credentials.as_ref()).await?;
            checks.answers.insert(key, may);
            may
        }
    };
    match (may, &credentials) {
        (true, _) => Ok(()),
        (false, None) => Err(Error::LoginRequired),
        (false, Some(_)) => Err(Error::Denied),
    }
}
