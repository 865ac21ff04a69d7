//! Several instances sharing one PostgreSQL database and one cache directory.
//!
//! Each "instance" here is what a `dunite` process holds: its own `Database` (its own pool and
//! write turn) and its own cache handle over the same directory. They meet only where two
//! processes would: in the database and on disk.

use std::sync::Arc;
use std::time::Duration;

use dunite_core::{
    Database, DatabaseOptions, EntryStore, EvictionPass as _, EvictionPolicy, EvictionStore as _, Expected,
    OnConflict, Removal, StoreOutcome,
};
use dunite_oci::{BlobCache, Digest};
use dunite_testkit::{PoolTally, check_consistency, pg};

use crate::{blob, eventually, read_verified};

const BLOB: usize = 16 * 1024;

/// Two databases handles on one fresh PostgreSQL database, or `None` without a test server.
async fn two_instances(options: &DatabaseOptions) -> Option<(Database, Database, pg::TestDatabase)> {
    let server = pg::fresh_database().await?;
    let a = Database::connect(server.url(), options).await.unwrap();
    let b = Database::connect(server.url(), options).await.unwrap();
    Some((a, b, server))
}

async fn entry_store(db: &Database, dir: &std::path::Path) -> EntryStore {
    EntryStore::open(db.clone(), dunite_oci::NAMESPACE, dir, 1 << 30, OnConflict::KeepExisting).await.unwrap()
}

async fn store_blob(store: &EntryStore, seed: u64) -> Digest {
    let (digest, bytes) = blob(seed, BLOB);
    let expected = Expected::new().with_size(BLOB as u64).with_digest(digest.content_digest().clone());
    store.store(&digest.to_string(), &bytes[..], &expected, "").await.unwrap();
    digest
}

/// At most one pass at a time across instances, and the one turned away holds nothing.
#[tokio::test]
async fn the_eviction_lock_admits_one_instance_at_a_time_and_turns_others_away_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some((a_db, b_db, _server)) = two_instances(&DatabaseOptions::new()).await else { return };
    let (a, b) = (entry_store(&a_db, dir.path()).await, entry_store(&b_db, dir.path()).await);

    let pass = a.begin_pass().await.unwrap().expect("the lock is free");
    assert!(b.begin_pass().await.unwrap().is_none(), "a second instance must not get a pass");
    // Turned away without keeping a connection checked out (the pool takes it back on a
    // task of its own: poll).
    eventually(Duration::from_secs(5), || async { b_db.pool().num_idle() == b_db.pool().size() as usize })
        .await;
    pass.finish().await.unwrap();

    let pass = b.begin_pass().await.unwrap().expect("released by finish");
    assert!(a.begin_pass().await.unwrap().is_none());
    // A pass dropped without finishing (cancelled) must not leave the lock behind.
    drop(pass);
    // The server releases it when it sees the connection close: poll, with a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let pass = loop {
        if let Some(pass) = a.begin_pass().await.unwrap() {
            break pass;
        }
        assert!(tokio::time::Instant::now() < deadline, "a dropped pass kept the eviction lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    pass.finish().await.unwrap();
}

/// How instance A stores a blob again while B's pass holds it as a victim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Again {
    /// Removed, then stored anew (a new row and file).
    AfterRemoval,
    /// Stored over the present entry, which is kept (`AlreadyPresent`).
    OverThePresentEntry,
}

/// A blob stored on A, selected as a victim by B's pass, then stored again on A `how`:
/// B's removal skips it, and it stays readable on both with rows and files in agreement.
async fn a_victim_stored_again_survives(how: Again) {
    let dir = tempfile::tempdir().unwrap();
    let Some((a_db, b_db, _server)) = two_instances(&DatabaseOptions::new()).await else { return };
    let (a, b) = (entry_store(&a_db, dir.path()).await, entry_store(&b_db, dir.path()).await);
    let digest = store_blob(&a, 1).await;

    let mut pass = b.begin_pass().await.unwrap().unwrap();
    let victims = pass.least_recently_used(10).await.unwrap();
    assert_eq!(victims.len(), 1);
    if how == Again::AfterRemoval {
        a.remove(&digest.to_string()).await.unwrap();
    }
    let (_, bytes) = blob(1, BLOB);
    let again = a.store(&digest.to_string(), &bytes[..], &Expected::new(), "").await.unwrap();
    let expected =
        if how == Again::AfterRemoval { StoreOutcome::Inserted } else { StoreOutcome::AlreadyPresent };
    assert_eq!(again.outcome, expected);
    assert_eq!(pass.remove_batch(&victims).await.unwrap(), vec![Removal::Skipped], "{how:?}");
    pass.finish().await.unwrap();

    assert!(b.open_entry(&digest.to_string()).await.unwrap().is_some(), "a hit on the other instance");
    assert_eq!(check_consistency(&a, dir.path()).await.unwrap(), BLOB as u64);
}

#[tokio::test]
async fn an_entry_re_stored_on_one_instance_is_not_removed_by_the_other() {
    a_victim_stored_again_survives(Again::AfterRemoval).await;
}

/// The store that finds the blob present makes the entry recent in the database, not only in
/// the storing process's memory (before, B removed it).
#[tokio::test]
async fn an_entry_stored_again_on_one_instance_is_not_removed_by_the_other() {
    a_victim_stored_again_survives(Again::OverThePresentEntry).await;
}

/// Bursts of stores through two instances over one cap: no errors, the shared total ends
/// under the cap, every blob left reads back with its digest on both instances, and rows,
/// total and files agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_keep_one_cap_under_concurrent_bursts() {
    const PER_INSTANCE: u64 = 48;
    const CAP: u64 = 12 * BLOB as u64;
    let dir = tempfile::tempdir().unwrap();
    let options = DatabaseOptions::new().with_max_connections(2);
    let Some((a_db, b_db, _server)) = two_instances(&options).await else { return };
    let policy = EvictionPolicy::new(CAP).without_safety_tick();
    let open =
        |db: Database| BlobCache::new(BlobCache::options(dir.path(), policy.clone()).with_database(db));
    let (a, b) = (open(a_db).await.unwrap(), open(b_db).await.unwrap());

    let (digest, bytes) = blob(999_999, BLOB);
    a.store(&digest, &bytes[..]).await.unwrap();
    assert!(read_verified(&b, &digest).await.is_some(), "stored on one instance, a hit on the other");

    let tally = Arc::new(PoolTally::default());
    let mut tasks = tokio::task::JoinSet::new();
    for (n, cache) in [a.clone(), b.clone()].into_iter().enumerate() {
        for lane in 0..2u64 {
            let (cache, tally) = (cache.clone(), tally.clone());
            tasks.spawn(async move {
                let mut stored = Vec::new();
                for i in 0..PER_INSTANCE / 2 {
                    let (digest, bytes) = blob(n as u64 * 10_000 + lane * 1_000 + i, BLOB);
                    match cache.store(&digest, &bytes[..]).await {
                        Ok(_) => stored.push(digest),
                        Err(e) => tally.record(e.as_cache().unwrap()),
                    }
                }
                stored
            });
        }
    }
    let stored: Vec<Digest> = tasks.join_all().await.into_iter().flatten().collect();
    assert_eq!(tally.pool_timeouts() + tally.other_errors(), 0, "stores failed under the burst");

    eventually(Duration::from_secs(30), || async { a.total_bytes().await.unwrap() <= CAP }).await;
    // Quiescent now: whichever instance evicts, the other sees the same total.
    a.evict_if_over_cap().await.unwrap();
    b.evict_if_over_cap().await.unwrap();
    let total = check_consistency(a.entries().entries(), dir.path()).await.unwrap();
    assert!(total <= CAP, "shared total {total} over the cap {CAP}");
    assert_eq!(b.total_bytes().await.unwrap(), total);
    let mut present = 0;
    for digest in &stored {
        let on_a = read_verified(&a, digest).await.is_some();
        let on_b = read_verified(&b, digest).await.is_some();
        assert_eq!(on_a, on_b, "both instances must agree on {digest}");
        present += u64::from(on_a);
    }
    assert_eq!(present * BLOB as u64 + BLOB as u64 * u64::from(a.contains(&digest).await.unwrap()), total);
    for cache in [&a, &b] {
        assert_eq!(cache.stats().evictor.errors, 0, "{:?}", cache.stats());
    }
}
