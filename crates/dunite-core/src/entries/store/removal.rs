//! Removal from an [`EntryStore`]: mark, unlink and delete (for an explicit remove and for a
//! pass's victims), finishing removals an outage interrupted, and settling stores whose
//! COMMIT failed unseen.

use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::AnyConnection;

use super::write::adjust_totals;
use super::{EntryStore, Inner, lock, to_i64, to_u64, values_list};
use crate::{Error, Removal, Result, Victim};

/// Interrupted removals a pass finishes before its own work (the rest wait for the next).
const MARKED_PER_PASS: usize = 64;

/// The statement that marks `n` selected victims for removal, each only if it still has the
/// version it was selected at and is not pinned by an operator: `$1` the namespace, then
/// (key, version) pairs. It finds each row by an index lookup, never by walking the namespace
/// (see the plan tests below).
fn mark_victims_sql(n: usize) -> String {
    format!(
        "UPDATE entries SET state = 1 WHERE namespace = $1 AND state = 0 AND pinned = 0 \
         AND (key, version) IN (VALUES {}) RETURNING key, file",
        values_list(2, n, 2)
    )
}

/// A store's payload whose fate is open: its COMMIT failed unseen (the database will say
/// whether a row names it), or a payload no row names that could not be deleted yet.
#[derive(Clone)]
pub(super) struct Unsettled {
    pub(super) key: String,
    /// The new payload.
    pub(super) file: String,
    /// The payload the store replaced, if its commit happened.
    pub(super) replaced: Option<String>,
    pub(super) at: std::time::Instant,
}

/// How long after a store's COMMIT failed unseen its outcome is asked for: time for a server
/// that received the COMMIT to have applied it.
const SETTLE_AFTER: Duration = Duration::from_secs(1);

/// Payloads settled per call at most (a flusher tick, or the start of a pass), one write turn
/// each: after a burst of failures on a slow database, settling must not hold up a pass.
const SETTLE_PER_CALL: usize = 64;

impl EntryStore {
    /// Remove `key` now, whatever its age. Returns the bytes freed, if it was present.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] or [`Error::Io`]; a failed removal is finished by the next
    /// [`reconcile`](Self::reconcile).
    pub async fn remove(&self, key: &str) -> Result<Option<u64>> {
        let mut conn = self.inner.db.acquire().await?;
        match self.inner.remove_entries(&mut conn, Targets::Key(key)).await?.first() {
            Some(Removal::Removed { bytes }) => Ok(Some(*bytes)),
            _ => Ok(None),
        }
    }
}

impl Inner {
    /// Settle `key`'s payload `file` later (after [`SETTLE_AFTER`], on a flusher tick or a
    /// pass): kept if its row names it, deleted if none does; with `replaced`, the payload it
    /// replaced goes too once no row names that. For a COMMIT that failed unseen, and for a
    /// payload without a row whose deletion failed (so it is not left on disk, uncounted,
    /// until a restart).
    pub(super) fn settle_later(&self, key: String, file: String, replaced: Option<String>) {
        let at = std::time::Instant::now();
        lock(&self.unsettled).push(Unsettled { key, file, replaced, at });
    }

    /// Settle the stores whose COMMIT failed unseen (at least [`SETTLE_AFTER`] ago): a payload
    /// its key's row names was committed and is an entry like any other; one no row names was
    /// not (or was committed and since replaced or removed), and is deleted. Without this,
    /// such a payload would stay on disk, uncounted, until the next start-up reconcile.
    ///
    /// Each payload is settled on its own: one that fails (a file the volume will not let go)
    /// goes to the back of the list and does not hold up the others. Returns the first error.
    pub(super) async fn settle_unseen_on(&self, conn: &mut AnyConnection) -> Result<()> {
        // Copies: each stays listed (and counted in `EntryStats::unsettled`) until it is
        // settled, so a cancelled call loses none and a waiter never sees 0 too early.
        let due: Vec<Unsettled> = lock(&self.unsettled)
            .iter()
            .filter(|u| u.at.elapsed() >= SETTLE_AFTER)
            .take(SETTLE_PER_CALL)
            .cloned()
            .collect();
        let mut first_error = None;
        for store in due {
            let settled = self.settle(conn, &store).await;
            let mut unsettled = lock(&self.unsettled);
            // Payload names are unique; another caller may have settled it meanwhile.
            if let Some(i) = unsettled.iter().position(|u| u.file == store.file) {
                let listed = unsettled.remove(i);
                if let Err(e) = settled {
                    // Asked again later, behind the others.
                    unsettled.push(listed);
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Settle one store whose COMMIT failed unseen. Idempotent, so a failure part way is
    /// retried from the start.
    ///
    /// The rows are read inside a write transaction: it waits for the namespace's write lock,
    /// so a COMMIT still in flight on the server (its answer lost, the server slow to apply
    /// it) has ended, applied or not, before the answer is taken as final.
    async fn settle(&self, conn: &mut AnyConnection, store: &Unsettled) -> Result<()> {
        let (named, old_named) = {
            let _turn = self.db.write_turn(&self.namespace).await;
            let mut tx = self.db.begin_write(conn, &self.namespace, "begin settling a store").await?;
            let named = self.names(&mut tx, &store.key, &store.file).await?;
            let old_named = match &store.replaced {
                Some(old) => self.names(&mut tx, &store.key, old).await?,
                None => false,
            };
            tx.commit().await.map_err(Error::db("settle a store"))?;
            (named, old_named)
        };
        if named {
            // Committed: an entry like any other, and what it replaced has no row any more.
            if let Some(old) = &store.replaced {
                self.layout.unlink(old).await?;
            }
            self.committed();
            return Ok(());
        }
        // Not committed, or committed and since replaced or removed (whoever did that deleted
        // or will delete the payload). What it would have replaced is either still the key's
        // payload or, if the commit happened, named by no row.
        self.layout.unlink(&store.file).await?;
        if let Some(old) = &store.replaced
            && !old_named
        {
            self.layout.unlink(old).await?;
        }
        Ok(())
    }

    /// Whether `key`'s row names the payload `file` (in any state).
    async fn names(&self, conn: &mut AnyConnection, key: &str, file: &str) -> Result<bool> {
        self.db.round_trip().await;
        let named: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM entries WHERE namespace = $1 AND key = $2 AND file = $3")
                .bind(&self.namespace)
                .bind(key)
                .bind(file)
                .fetch_optional(&mut *conn)
                .await
                .map_err(Error::db("settle a store's unseen commit"))?;
        Ok(named.is_some())
    }

    /// Mark, unlink, delete, for several entries in two write turns (not two per entry).
    ///
    /// `Targets::Victims` removes each victim only if it still has the version it was selected
    /// at, is not pinned and has no newer access pending; `Targets::Key` removes one key
    /// whatever its version. Returns one [`Removal`] per target, in order.
    pub(crate) async fn remove_entries(
        &self,
        conn: &mut AnyConnection,
        targets: Targets<'_>,
    ) -> Result<Vec<Removal>> {
        let keys: Vec<&str> = match &targets {
            Targets::Victims(victims) => victims.iter().map(|v| v.key.as_str()).collect(),
            Targets::Key(key) => vec![key],
        };
        let mut out = vec![Removal::Skipped; keys.len()];
        // In-memory conditions first: pinned, or touched since selection.
        let eligible: Vec<usize> = match &targets {
            Targets::Victims(victims) => {
                let touches = lock(&self.touches);
                let pins = lock(&self.pins);
                (0..victims.len())
                    .filter(|&i| {
                        let v = &victims[i];
                        !pins.contains_key(&v.key)
                            && touches.get(&v.key).is_none_or(|&stamp| stamp <= v.version)
                    })
                    .collect()
            }
            Targets::Key(_) => vec![0],
        };
        if eligible.is_empty() {
            return Ok(out);
        }
        // 1. Mark: from here on no reader is handed these rows.
        let marked: Vec<(String, String)> = {
            let _turn = self.db.write_turn(&self.namespace).await;
            let mut tx = self.db.begin_write(conn, &self.namespace, "begin a removal").await?;
            self.db.round_trip().await;
            let (sql, pairs) = match &targets {
                Targets::Victims(_) => (mark_victims_sql(eligible.len()), true),
                Targets::Key(_) => {
                    ("UPDATE entries SET state = 1 WHERE namespace = $1 AND state = 0 AND key = $2 RETURNING key, file".to_owned(), false)
                }
            };
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(&self.namespace);
            for &i in &eligible {
                query = query.bind(keys[i]);
                if pairs && let Targets::Victims(victims) = &targets {
                    query = query.bind(victims[i].version);
                }
            }
            let marked = query.fetch_all(&mut *tx).await.map_err(Error::db("mark entries for removal"))?;
            tx.commit().await.map_err(Error::db("commit a removal mark"))?;
            marked
        };
        // Pinned between the check and the mark: put those back (rare).
        let mut doomed = Vec::with_capacity(marked.len());
        for (key, file) in marked {
            if matches!(targets, Targets::Victims(_)) && self.is_pinned(&key) {
                let _turn = self.db.write_turn(&self.namespace).await;
                let mut tx = self.db.begin_write(conn, &self.namespace, "begin an unmark").await?;
                self.db.round_trip().await;
                let unmarked = sqlx::query(
                    "UPDATE entries SET state = 0 WHERE namespace = $1 AND key = $2 AND state = 1 AND file = $3",
                )
                .bind(&self.namespace)
                .bind(&key)
                .bind(&file)
                .execute(&mut *tx)
                .await
                .map_err(Error::db("unmark an entry"))?;
                tx.commit().await.map_err(Error::db("commit an unmark"))?;
                if unmarked.rows_affected() == 0 {
                    // A store took the marked row over meanwhile (and left the old payload to
                    // this removal), or another remover finished it: either way the old file
                    // has no row any more. Unlink it; the row delete below then matches
                    // nothing, so the entry counts as skipped and the total stays right.
                    doomed.push((key, file));
                }
            } else {
                doomed.push((key, file));
            }
        }
        // 2. Unlink, holding no transaction. Readers that opened a file keep their bytes. A
        // payload that cannot be unlinked stays marked (and counted) for a later pass to
        // finish (`finish_marked`); the others are removed. A pass goes on with other victims
        // (its entry counts as skipped); an explicit remove reports the error.
        let mut unlinked = Vec::with_capacity(doomed.len());
        let mut failure = None;
        for (key, file) in doomed {
            match self.layout.unlink(&file).await {
                Ok(()) => unlinked.push((key, file)),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        // 3. Delete the rows and subtract their bytes, unless a store took a row over.
        for (key, _, size) in self.delete_marked(conn, &unlinked).await? {
            if let Some(i) = keys.iter().position(|k| *k == key) {
                out[i] = Removal::Removed { bytes: to_u64(size) };
            }
        }
        match (failure, &targets) {
            (Some(e), Targets::Key(_)) => Err(e),
            (Some(error), Targets::Victims(_)) => {
                tracing::warn!(%error, "a victim's payload could not be deleted; it stays counted until it can be");
                Ok(out)
            }
            (None, _) => Ok(out),
        }
    }

    /// The last step of a removal: delete the rows of `rows` (key, file) that are still
    /// marked and still name their file, and subtract their bytes, in one write transaction;
    /// a row a store took over meanwhile (new file, live again) or a remover put back (live
    /// again) is left alone. Returns the rows deleted, with their sizes.
    pub(crate) async fn delete_marked(
        &self,
        conn: &mut AnyConnection,
        rows: &[(String, String)],
    ) -> Result<Vec<(String, String, i64)>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let _turn = self.db.write_turn(&self.namespace).await;
        let mut tx = self.db.begin_write(conn, &self.namespace, "begin a removal").await?;
        self.db.round_trip().await;
        let sql = format!(
            "DELETE FROM entries WHERE namespace = $1 AND state = 1 AND (key, file) IN (VALUES {}) \
             RETURNING key, file, size",
            values_list(2, rows.len(), 2)
        );
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(&self.namespace);
        for (key, file) in rows {
            query = query.bind(key.as_str()).bind(file.as_str());
        }
        let deleted: Vec<(String, String, i64)> =
            query.fetch_all(&mut *tx).await.map_err(Error::db("delete entries"))?;
        let bytes: i64 = deleted.iter().map(|(_, _, size)| size).sum();
        let entries = i64::try_from(deleted.len()).unwrap_or(i64::MAX);
        adjust_totals(&mut tx, &self.db, &self.namespace, -bytes, -entries).await?;
        tx.commit().await.map_err(Error::db("commit a removal"))?;
        Ok(deleted)
    }

    /// Finish removals interrupted after their mark (the database or the disk failed between
    /// the steps): their rows are never handed out, but their bytes still count until
    /// deleted. Run at the start of every pass, so an outage does not leave the total
    /// overstated until the next restart. Safe beside a removal still in flight (on another
    /// instance, or an explicit remove): unlinking twice is harmless and a row is deleted,
    /// and its bytes subtracted, once.
    ///
    /// Each pass takes the next [`MARKED_PER_PASS`] in version order after where the last one
    /// stopped, wrapping around: rows that cannot be finished do not hide the ones behind.
    pub(super) async fn finish_marked(&self, conn: &mut AnyConnection) -> Result<u64> {
        let after = self.marked_after.load(Ordering::Relaxed);
        self.db.round_trip().await;
        let marked: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT key, file, version FROM entries WHERE namespace = $1 AND state = 1 AND version > $2 \
             ORDER BY version LIMIT $3",
        )
        .bind(&self.namespace)
        .bind(after)
        .bind(to_i64(MARKED_PER_PASS as u64))
        .fetch_all(&mut *conn)
        .await
        .map_err(Error::db("list interrupted removals"))?;
        let next = match marked.last() {
            Some((_, _, version)) if marked.len() == MARKED_PER_PASS => *version,
            _ => i64::MIN,
        };
        self.marked_after.store(next, Ordering::Relaxed);
        // A payload that cannot be unlinked (permissions on a shared volume, an I/O error)
        // is logged and left marked: one such row must not stop every pass.
        let mut unlinked = Vec::with_capacity(marked.len());
        for (key, file, _) in marked {
            match self.layout.unlink(&file).await {
                Ok(()) => unlinked.push((key, file)),
                Err(error) => {
                    let key = self.shown(&key);
                    tracing::warn!(%error, key, "cannot finish an interrupted removal; leaving it marked");
                }
            }
        }
        let deleted = self.delete_marked(conn, &unlinked).await?;
        if !deleted.is_empty() {
            tracing::info!(namespace = %self.namespace, rows = deleted.len(), "finished interrupted removals");
        }
        Ok(deleted.len() as u64)
    }
}

/// What [`Inner::remove_entries`] removes.
pub(crate) enum Targets<'a> {
    /// Eviction victims, each conditional on its selected version.
    Victims(&'a [Victim]),
    /// One key, unconditionally.
    Key(&'a str),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests report failure by panicking")]

    use sqlx::Any;

    use super::*;
    use crate::entries::layout::Expected;
    use crate::entries::store::{OnConflict, StoreOutcome};
    use crate::{Database, DatabaseOptions, EvictionPass, EvictionStore};

    /// Payload files under `dir`'s `data/`.
    fn payloads(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("data"))
            .unwrap()
            .map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap().count())
            .sum()
    }

    /// Regression: an eviction marks an entry, finds it pinned, and queues its unmark behind a
    /// store that replaces the marked row (leaving the old payload to the remover). The unmark
    /// then matches nothing, and the old payload used to stay on disk with no row until the
    /// next start-up. The order is forced through the write turn (FIFO) on a current-thread
    /// runtime: remover queued first, then the store, then the turn released.
    #[tokio::test]
    async fn a_row_replaced_between_mark_and_unmark_leaves_no_orphan_payload() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            Database::open_sqlite(&dir.path().join("metadata.db"), &DatabaseOptions::new()).await.unwrap();
        let store =
            EntryStore::open(db.clone(), "race", dir.path(), 1 << 20, OnConflict::Replace).await.unwrap();
        store.store("k", &[1u8; 1000][..], &Expected::new(), "").await.unwrap();
        let mut pass = store.begin_pass().await.unwrap().unwrap();
        let victims = pass.least_recently_used(10).await.unwrap();
        assert_eq!(victims.len(), 1);

        let turn = db.write_turn("race").await;
        let remover = tokio::spawn(async move {
            let removals = pass.remove_batch(&victims).await;
            pass.finish().await.unwrap();
            removals
        });
        // The remover runs until it waits for the turn: past its pin check, before its mark.
        let waiters = |n: usize| {
            let db = db.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while db.turn_waiters.load(Ordering::SeqCst) < n {
                    assert!(tokio::time::Instant::now() < deadline, "fewer than {n} waiting for the turn");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        waiters(1).await;
        let pin = store.pin("k");
        let storer = {
            let store = store.clone();
            tokio::spawn(async move { store.store("k", &[2u8; 2000][..], &Expected::new(), "").await })
        };
        // The store writes and renames its payload, then takes a connection and waits for
        // the turn, behind the remover.
        waiters(2).await;
        assert_eq!(payloads(dir.path()), 2, "the store's payload is in place beside the old one");
        drop(turn);

        let removals = remover.await.unwrap().unwrap();
        assert_eq!(storer.await.unwrap().unwrap().outcome, StoreOutcome::Replaced);
        drop(pin);
        assert_eq!(removals, vec![Removal::Skipped]);
        assert_eq!(store.total_bytes().await.unwrap(), 2000);
        assert_eq!(payloads(dir.path()), 1, "the replaced payload must not outlive its row");
        let mut entry = store.open_entry("k").await.unwrap().unwrap();
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut entry.file, &mut bytes).await.unwrap();
        assert_eq!(bytes, vec![2u8; 2000]);
    }

    /// Bind a sample of `n` (key, version) pairs to the mark statement, `EXPLAIN`ed with
    /// `explain` in front of it.
    fn explained_mark(explain: &str, n: usize) -> sqlx::query::Query<'static, Any, sqlx::any::AnyArguments> {
        let mut query =
            sqlx::query(sqlx::AssertSqlSafe(format!("{explain} {}", mark_victims_sql(n)))).bind("ns");
        for i in 0..n {
            query = query.bind(format!("key-{i}")).bind(i64::try_from(i).unwrap());
        }
        query
    }

    /// The mark statement finds each victim by an index lookup (key or version equal), and never
    /// scans the table or walks the namespace's rows through `entries_lru` (issue 16).
    #[tokio::test]
    async fn the_mark_statement_looks_rows_up_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            Database::open_sqlite(&dir.path().join("metadata.db"), &DatabaseOptions::new()).await.unwrap();
        let _store =
            EntryStore::open(db.clone(), "ns", dir.path(), 1 << 30, OnConflict::KeepExisting).await.unwrap();
        let plan = explained_mark("EXPLAIN QUERY PLAN", 64).fetch_all(db.pool()).await.unwrap();
        let details: Vec<String> = plan.iter().map(|row| sqlx::Row::get::<String, _>(row, 3)).collect();
        let on_entries: Vec<&String> = details.iter().filter(|d| d.contains(" entries")).collect();
        assert!(!on_entries.is_empty(), "{details:?}");
        for line in on_entries {
            assert!(line.starts_with("SEARCH entries USING"), "the mark scans entries: {details:?}");
            assert!(
                line.contains("key=?") || line.contains("version=?"),
                "the mark walks the namespace instead of looking rows up: {details:?}"
            );
        }
    }

    /// The same on PostgreSQL, on a namespace of 100,000 analysed rows (on a table of a few
    /// hundred rows, with sequential scans discouraged, the planner reads every live row of the
    /// namespace through `entries_lru` instead: a plan only a tiny table gets).
    #[tokio::test]
    async fn the_mark_statement_looks_rows_up_on_postgres() {
        let Some(server) = dunite_testkit::pg::fresh_database().await else { return };
        let db = Database::connect(server.url(), &DatabaseOptions::new()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store =
            EntryStore::open(db.clone(), "ns", dir.path(), 1 << 30, OnConflict::KeepExisting).await.unwrap();
        store.store("k", &[1u8; 10][..], &Expected::new(), "").await.unwrap();
        // A namespace of a realistic size, so the planner's choice is the one production sees.
        let mut conn = db.pool().acquire().await.unwrap();
        sqlx::query(
            "INSERT INTO entries (namespace, key, file, size, version, stored_at) \
             SELECT 'ns', 'key-' || g, 'file-' || g, 1, g, 0 FROM generate_series(100, 100099) AS g",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::query("ANALYZE entries").execute(&mut *conn).await.unwrap();
        let plan = explained_mark("EXPLAIN", 64).fetch_all(&mut *conn).await.unwrap();
        let plan: Vec<String> = plan.iter().map(|row| sqlx::Row::get::<String, _>(row, 0)).collect();
        let text = plan.join("\n");
        assert!(!text.contains("Seq Scan on entries"), "the mark scans entries:\n{text}");
        assert!(
            plan.iter().any(|line| line.contains("Index Cond") && (line.contains("key") || line.contains("version"))),
            "the mark does not look rows up by key or version:\n{text}"
        );
    }
}
