//! Cross-instance fill leases: one upstream fetch per key across every instance that shares a
//! PostgreSQL database and a cache directory.
//!
//! A fill's single flight ([`Fills::join`](super::Fills::join)) is per process. With a shared
//! database, the instance whose fill starts first also inserts a row in `fill_leases`: the
//! lease, naming its owner (instance and lease number), a heartbeat on the database's clock,
//! and, once the upstream answered, the spool's file name in the cache's `tmp/`, the body's
//! announced size and the fill's head. An instance that finds a live lease does not ask the
//! upstream: it follows the owner's spool as it grows (see `follow`).
//!
//! - **Heartbeat.** The owner refreshes the row every third of the lease timeout
//!   ([`FillOptions::with_lease_timeout`](super::FillOptions::with_lease_timeout)). A row whose
//!   heartbeat is older than the timeout belongs to a dead owner (killed, cut off from the
//!   database): the next instance to want the key deletes it (only that row: it names the
//!   lease), removes its spool and takes a lease of its own.
//! - **Release.** The owner deletes its row when its fill ends, whatever the outcome: after the
//!   commit on success, so a follower that sees the row gone finds the entry; on a failure, a
//!   panic or a cancellation, through the guard's drop. The timeout is the backstop for a
//!   process that dies.
//! - **Failure of the database.** A lease that cannot be taken or read (the database is down)
//!   does not stop the fill: it runs without one, as on a single instance.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::entries::Database;
use crate::{Error, Result};

/// What a fill learns from the upstream's answer, as text a follower on another instance can
/// read back: the head of fills that may be shared through leases.
///
/// Implemented for `()` (a fill that learns nothing, such as a blob's).
pub trait LeaseHead: Sized + Send + Sync + 'static {
    /// The head as text (stored in the lease's row).
    fn encode(&self) -> String;

    /// The head back from [`encode`](Self::encode)'s text; `None` if it cannot be read (the
    /// follower then fills on its own).
    fn decode(text: &str) -> Option<Self>;
}

impl LeaseHead for () {
    fn encode(&self) -> String {
        String::new()
    }

    fn decode(_text: &str) -> Option<Self> {
        Some(())
    }
}

/// How many times `acquire` goes round (insert, read, take over) before it gives up: a row
/// that keeps vanishing and reappearing means other instances are busy with the key.
const ACQUIRE_ROUNDS: usize = 8;

/// The lease table of one cache (namespace) in a shared database.
#[derive(Debug, Clone)]
pub(super) struct Leases {
    db: Database,
    namespace: Arc<str>,
    /// The cache's `tmp/`: where every instance's spools are.
    tmp: Arc<std::path::Path>,
    timeout: Duration,
}

/// A lease's row as another instance reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LeaseRow {
    pub(super) owner: String,
    pub(super) lease: i64,
    /// The spool's file name in `tmp/`; empty until the owner's upstream answered.
    pub(super) spool: String,
    pub(super) total: Option<u64>,
    pub(super) head: String,
    /// The heartbeat is older than the timeout: the owner is gone.
    pub(super) stale: bool,
}

impl LeaseRow {
    /// Whether `other` is the same lease (possibly further along).
    pub(super) fn same_lease(&self, other: &Self) -> bool {
        self.owner == other.owner && self.lease == other.lease
    }
}

/// What [`Leases::acquire`] found.
#[derive(Debug)]
pub(super) enum Acquired {
    /// This instance owns the fill now.
    Owner(OwnerLease),
    /// Another instance's live lease.
    Held(LeaseRow),
    /// No lease, and the cache holds a live entry of the key: a fill of another instance
    /// landed since the caller looked.
    Cached,
}

impl Leases {
    pub(super) fn new(db: Database, namespace: &str, tmp: &std::path::Path, timeout: Duration) -> Self {
        Self { db, namespace: Arc::from(namespace), tmp: Arc::from(tmp), timeout }
    }

    /// How long a follower waits between reads of a lease's row once the spool is known.
    pub(super) fn row_poll(&self) -> Duration {
        (self.timeout / 6).clamp(Duration::from_millis(25), Duration::from_millis(250))
    }

    /// Take the lease of `key`, or find the live lease another instance holds. A stale lease
    /// (its owner's heartbeat older than the timeout) is deleted, its spool removed, and taken.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the table cannot be read or written, or the key stays contended
    /// for [`ACQUIRE_ROUNDS`].
    pub(super) async fn acquire(&self, key: &str) -> Result<Acquired> {
        for _ in 0..ACQUIRE_ROUNDS {
            let lease = next_lease();
            // Only while the cache does not hold the key: a fill that landed (and released
            // its lease) between the caller's look-up and this insert is not fetched again.
            let inserted = self
                .update(
                    "take a fill lease",
                    "INSERT INTO fill_leases (namespace, key, owner, lease) SELECT $1, $2, $3, $4 \
                     WHERE NOT EXISTS (SELECT 1 FROM entries WHERE namespace = $1 AND key = $2 AND state = 0) \
                     ON CONFLICT DO NOTHING",
                    key,
                    lease,
                )
                .await?;
            if inserted {
                tracing::debug!(namespace = %self.namespace, lease, "fill lease taken");
                return Ok(Acquired::Owner(OwnerLease::start(self.clone(), key, lease)));
            }
            let Some(row) = self.read(key).await? else {
                // Not leased: held by the cache, or released between the insert and the read.
                return Ok(Acquired::Cached);
            };
            if !row.stale {
                return Ok(Acquired::Held(row));
            }
            self.take_over(key, &row).await?;
        }
        Err(Error::Database {
            op: "take a fill lease",
            source: Arc::new(sqlx::Error::Protocol("the fill lease stayed contended".into())),
        })
    }

    /// The lease row of `key`, if any.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if it cannot be read.
    pub(super) async fn read(&self, key: &str) -> Result<Option<LeaseRow>> {
        let mut conn = self.db.acquire().await?;
        self.db.round_trip().await;
        let row: Option<(String, i64, String, Option<i64>, String, bool)> = sqlx::query_as(
            "SELECT owner, lease, spool, total, head, heartbeat < now() - $3 * interval '1 millisecond' \
             FROM fill_leases WHERE namespace = $1 AND key = $2",
        )
        .bind(&*self.namespace)
        .bind(key)
        .bind(millis(self.timeout))
        .fetch_optional(&mut *conn)
        .await
        .map_err(Error::db("read a fill lease"))?;
        Ok(row.map(|(owner, lease, spool, total, head, stale)| LeaseRow {
            owner,
            lease,
            spool,
            total: total.and_then(|total| u64::try_from(total).ok()),
            head,
            stale,
        }))
    }

    /// Delete the stale lease `row` of `key` (only if it is still that lease and still
    /// stale) and remove its spool.
    async fn take_over(&self, key: &str, row: &LeaseRow) -> Result<()> {
        let mut conn = self.db.acquire().await?;
        self.db.round_trip().await;
        let deleted = sqlx::query(
            "DELETE FROM fill_leases WHERE namespace = $1 AND key = $2 AND owner = $3 AND lease = $4 \
             AND heartbeat < now() - $5 * interval '1 millisecond'",
        )
        .bind(&*self.namespace)
        .bind(key)
        .bind(&row.owner)
        .bind(row.lease)
        .bind(millis(self.timeout))
        .execute(&mut *conn)
        .await
        .map_err(Error::db("take over a fill lease"))?
        .rows_affected();
        drop(conn);
        if deleted == 1 {
            tracing::info!(
                namespace = %self.namespace,
                owner = row.owner,
                "took over a fill whose owner stopped its heartbeat"
            );
            if let Some(path) = self.spool_path(&row.spool) {
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => {}
                    // Moved into place before its owner died, or removed by another taker.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => {
                        tracing::warn!(%error, path = %path.display(), "cannot remove a dead fill's spool")
                    }
                }
            }
        }
        Ok(())
    }

    /// The path of a spool named in a lease row (see [`spool_in`]).
    pub(super) fn spool_path(&self, name: &str) -> Option<std::path::PathBuf> {
        spool_in(&self.tmp, name)
    }

    /// Run `sql` with the namespace, `key`, this instance and `lease` as `$1` to `$4`: whether
    /// it touched a row.
    async fn update(&self, op: &'static str, sql: &'static str, key: &str, lease: i64) -> Result<bool> {
        let mut conn = self.db.acquire().await?;
        self.db.round_trip().await;
        let affected = sqlx::query(sql)
            .bind(&*self.namespace)
            .bind(key)
            .bind(instance_id())
            .bind(lease)
            .execute(&mut *conn)
            .await
            .map_err(Error::db(op))?
            .rows_affected();
        Ok(affected == 1)
    }
}

/// A lease this instance owns: heartbeats while it lives, and is released (its row deleted)
/// by [`release`](Self::release) or, failing that, when dropped.
#[derive(Debug)]
pub(super) struct OwnerLease {
    leases: Leases,
    key: String,
    lease: i64,
    heartbeat: tokio::task::JoinHandle<()>,
    released: bool,
}

impl OwnerLease {
    fn start(leases: Leases, key: &str, lease: i64) -> Self {
        let beat = leases.clone();
        let beat_key = key.to_owned();
        let heartbeat = tokio::spawn(async move {
            let mut interval = tokio::time::interval(beat.timeout / 3);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                let beaten = beat
                    .update(
                        "refresh a fill lease",
                        "UPDATE fill_leases SET heartbeat = now() \
                         WHERE namespace = $1 AND key = $2 AND owner = $3 AND lease = $4",
                        &beat_key,
                        lease,
                    )
                    .await;
                match beaten {
                    Ok(true) => {}
                    Ok(false) => {
                        // Taken over: another instance judged this one dead. This fill goes on
                        // for its own clients (its spool may be gone from the directory, so it
                        // may end uncached).
                        tracing::warn!(namespace = %beat.namespace, lease, "fill lease lost to another instance");
                        return;
                    }
                    // Missed beats past the lease timeout hand this fill to another instance
                    // (its spool removed): an operator should see them coming.
                    Err(error) => tracing::warn!(
                        namespace = %beat.namespace,
                        lease,
                        %error,
                        "cannot refresh a fill lease; past the lease timeout another instance takes it over"
                    ),
                }
            }
        });
        Self { leases, key: key.to_owned(), lease, heartbeat, released: false }
    }

    /// Tell followers where the spool is, how large the body is announced to be and what the
    /// fill's head is.
    pub(super) async fn publish(&self, spool: &str, total: Option<u64>, head: &str) {
        let published = async {
            let mut conn = self.leases.db.acquire().await?;
            self.leases.db.round_trip().await;
            sqlx::query(
                "UPDATE fill_leases SET spool = $5, total = $6, head = $7 \
                 WHERE namespace = $1 AND key = $2 AND owner = $3 AND lease = $4",
            )
            .bind(&*self.leases.namespace)
            .bind(&self.key)
            .bind(instance_id())
            .bind(self.lease)
            .bind(spool)
            .bind(total.and_then(|total| i64::try_from(total).ok()))
            .bind(head)
            .execute(&mut *conn)
            .await
            .map_err(Error::db("publish a fill's spool"))
        };
        // Followers then wait for the lease to end or go stale, and fill on their own.
        if let Err(error) = published.await {
            tracing::warn!(%error, "cannot tell other instances where a fill spools");
        }
    }

    /// Delete the lease's row.
    pub(super) async fn release(mut self) {
        self.heartbeat.abort();
        self.released = true;
        release(self.leases.clone(), self.key.clone(), self.lease).await;
    }
}

impl Drop for OwnerLease {
    fn drop(&mut self) {
        self.heartbeat.abort();
        if self.released {
            return;
        }
        // A panic or a cancellation: release on a task of its own. Without a runtime (it is
        // shutting down), the lease goes stale and is taken over after the timeout.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(release(self.leases.clone(), std::mem::take(&mut self.key), self.lease));
        }
    }
}

async fn release(leases: Leases, key: String, lease: i64) {
    let sql = "DELETE FROM fill_leases WHERE namespace = $1 AND key = $2 AND owner = $3 AND lease = $4";
    match leases.update("release a fill lease", sql, &key, lease).await {
        Ok(_) => tracing::debug!(namespace = %leases.namespace, lease, "fill lease released"),
        Err(error) => {
            tracing::warn!(%error, "cannot release a fill lease; it expires after the lease timeout");
        }
    }
}

/// The path of a spool named `name` in `tmp`: a plain `fill-` file name, nothing else (a row
/// cannot steer a path out of the cache's directory).
fn spool_in(tmp: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    let plain = name.starts_with("fill-")
        && !name.contains(['/', '\\', '\0'])
        && std::path::Path::new(name).file_name().is_some_and(|file| file == name);
    plain.then(|| tmp.join(name))
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A number for the next lease this process takes.
fn next_lease() -> i64 {
    static NEXT: AtomicI64 = AtomicI64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// This process's name in lease rows: host name, process id and a random nonce (process ids
/// repeat across hosts and restarts).
pub(super) fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        use std::hash::{BuildHasher as _, Hasher as _};
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_default();
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        format!("{host}/{}/{:016x}", std::process::id(), hasher.finish())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_stable_within_a_process() {
        assert_eq!(instance_id(), instance_id());
        assert!(instance_id().contains(&format!("/{}/", std::process::id())));
    }

    #[test]
    fn rows_name_spools_in_tmp_only() {
        let tmp = std::path::Path::new("/cache/tmp");
        assert_eq!(spool_in(tmp, "fill-abc"), Some(tmp.join("fill-abc")));
        for bad in ["", "store-abc", "fill-../x", "fill-a/b", "../fill-a", "fill-a\\b", "fill-\0"] {
            assert_eq!(spool_in(tmp, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lease_numbers_do_not_repeat() {
        let (a, b) = (next_lease(), next_lease());
        assert!(b > a);
    }
}
