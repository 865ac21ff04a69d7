//! The SQL entry store under faults found in review: a commit whose answer is lost, a start-up
//! reconcile beside an adopted file, a peer holding a namespace's lock, a marked payload that
//! cannot be unlinked. Each test failed before its fix.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use dunite_core::{
    CacheOptions, Database, DatabaseOptions, EntryCache, EntryStore, EvictionPolicy, Expected, OnConflict,
    StoreOutcome,
};
use dunite_testkit::pg;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn payloads(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("data"))
        .unwrap()
        .map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap().count())
        .sum()
}

async fn poll(what: &str, ready: impl AsyncFnMut() -> bool) {
    dunite_testkit::poll_until(Duration::from_secs(10), what, ready).await;
}

/// Sessions of this database waiting for a lock.
async fn lock_waiters(db: &Database) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    n
}

/// What [`commit_cutting_proxy`] does with the `COMMIT` it cuts the client off at.
#[derive(Clone, Copy)]
enum Cut {
    /// Forward it first: the commit happens, the client sees an error.
    AfterCommit,
    /// Drop it: the server sees the connection go mid-transaction and rolls back; the client
    /// sees the same error.
    BeforeCommit,
}

/// A TCP proxy to PostgreSQL that, once armed, cuts the client off at the next message
/// containing `COMMIT`, without its answer. Returns the proxy's port.
async fn commit_cutting_proxy(upstream: String, armed: Arc<AtomicBool>, how: Cut) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let armed = Arc::clone(&armed);
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let cut = Arc::new(tokio::sync::Notify::new());
                let cut_up = Arc::clone(&cut);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let hit = buf[..n].windows(6).any(|w| w == b"COMMIT")
                            && armed.swap(false, Ordering::SeqCst);
                        if hit && matches!(how, Cut::BeforeCommit) {
                            cut_up.notify_one();
                            return;
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        if hit {
                            // The server reads the COMMIT before the end of the stream.
                            cut_up.notify_one();
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 65536];
                loop {
                    tokio::select! {
                        read = server_read.read(&mut buf) => {
                            let n = match read { Ok(0) | Err(_) => break, Ok(n) => n };
                            if client_write.write_all(&buf[..n]).await.is_err() { break; }
                        }
                        () = cut.notified() => break,
                    }
                }
            });
        }
    });
    port
}

/// A fresh test database whose connections go through a [`commit_cutting_proxy`] that cuts
/// `how` once armed; `None` without a test server.
async fn database_behind_a_commit_cutter(how: Cut) -> Option<(Database, Arc<AtomicBool>, pg::TestDatabase)> {
    let server = pg::fresh_database().await?;
    let url = server.url().to_owned();
    let (userinfo, rest) = url.split_once("://").unwrap().1.split_once('@').unwrap();
    let (host_port, database) = rest.split_once('/').unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let port = commit_cutting_proxy(host_port.to_owned(), Arc::clone(&armed), how).await;
    let proxied = format!("postgres://{userinfo}@127.0.0.1:{port}/{database}");
    let db = Database::connect(&proxied, &DatabaseOptions::new()).await.unwrap();
    Some((db, armed, server))
}

/// A `KeepExisting` store in a fresh directory behind a [`commit_cutting_proxy`].
async fn store_behind_a_commit_cutter(
    how: Cut,
) -> Option<(EntryStore, Arc<AtomicBool>, tempfile::TempDir, pg::TestDatabase)> {
    let (db, armed, server) = database_behind_a_commit_cutter(how).await?;
    let dir = tempfile::tempdir().unwrap();
    let store = EntryStore::open(db, "blobs", dir.path(), 1 << 30, OnConflict::KeepExisting).await.unwrap();
    Some((store, armed, dir, server))
}

/// The last store of a burst commits but its answer is lost. Before the fix the store
/// returned the error before poking the evictor, and settling confirmed the row without
/// poking either: with no further store and no safety tick the cache stayed over its cap.
#[tokio::test]
async fn a_store_whose_commit_answer_is_lost_still_brings_the_cache_under_its_cap() {
    let Some((db, armed, _server)) = database_behind_a_commit_cutter(Cut::AfterCommit).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let policy = EvictionPolicy::new(2_500).without_safety_tick();
    let options = CacheOptions::new(dir.path(), "blobs", policy)
        .with_database(db)
        .with_access_flush_period(Duration::from_millis(50));
    let cache = EntryCache::open(options).await.unwrap();
    cache.store("a", &[1u8; 1000][..], &Expected::new(), "").await.unwrap();
    cache.store("b", &[2u8; 1000][..], &Expected::new(), "").await.unwrap();
    armed.store(true, Ordering::SeqCst);
    let err = cache.store("c", &[3u8; 1000][..], &Expected::new(), "").await.unwrap_err();
    assert!(err.is_database(), "{err}");
    poll("the cache back under its cap", async || {
        cache.total_bytes().await.is_ok_and(|total| total <= 2_500)
    })
    .await;
    poll("the unseen commit settled", async || cache.entries().stats().unsettled == 0).await;
    dunite_testkit::check_consistency(cache.entries(), dir.path()).await.unwrap();
}

/// A `Replace` store whose COMMIT applied with its answer lost: once settled, the payload it
/// replaced must go. Before the fix that file was never unlinked: no row named it, and it
/// stayed on disk above the accounted total until a restart.
#[tokio::test]
async fn a_replacement_whose_commit_answer_is_lost_deletes_the_replaced_payload() {
    let Some((db, armed, _server)) = database_behind_a_commit_cutter(Cut::AfterCommit).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = EntryStore::open(db, "dl", dir.path(), 1 << 30, OnConflict::Replace).await.unwrap();
    store.spawn_access_flusher(Duration::from_millis(20));
    store.store("k", &[1u8; 1000][..], &Expected::new(), "").await.unwrap();
    armed.store(true, Ordering::SeqCst);
    let err = store.store("k", &[2u8; 2000][..], &Expected::new(), "").await.unwrap_err();
    assert!(err.is_database(), "{err}");
    poll("the unseen commit settled", async || store.stats().unsettled == 0).await;
    poll("a healthy connection", async || store.total_bytes().await.is_ok()).await;
    assert_eq!(payloads(dir.path()), 1, "the replaced payload outlived its row");
    assert_eq!(dunite_testkit::check_consistency(&store, dir.path()).await.unwrap(), 2000);
}

/// The COMMIT of a store reaches the server but its answer is lost. The store reports a
/// database error, and must keep its payload: the row may exist. Before the fix the payload
/// was deleted, leaving a live, counted row without its file that every later store of the
/// key (`KeepExisting`) kept alive as `AlreadyPresent` while every read missed.
#[tokio::test]
async fn a_commit_whose_answer_is_lost_keeps_its_payload() {
    let Some((store, armed, dir, _server)) = store_behind_a_commit_cutter(Cut::AfterCommit).await else {
        return;
    };
    store.spawn_access_flusher(Duration::from_millis(20));
    armed.store(true, Ordering::SeqCst);
    let err = store.store("k", &[7u8; 1000][..], &Expected::new(), "").await.unwrap_err();
    assert!(err.is_database(), "{err}");
    assert_eq!(payloads(dir.path()), 1, "the payload of a commit that may have happened is kept");
    assert_eq!(store.stats().unsettled, 1);
    // Settled once the database answers: the row names the payload, so it stays.
    poll("the unseen commit settled", async || store.stats().unsettled == 0).await;
    assert_eq!(payloads(dir.path()), 1, "a committed payload was deleted when settled");

    // It did happen: the row is there, and readable, through any connection.
    poll("a healthy connection", async || store.total_bytes().await.is_ok()).await;
    assert_eq!(store.total_bytes().await.unwrap(), 1000);
    let mut entry = store.open_entry("k").await.unwrap().expect("the committed entry is readable");
    let mut bytes = Vec::new();
    entry.file.read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes, vec![7u8; 1000]);
    let again = store.store("k", &[7u8; 1000][..], &Expected::new(), "").await.unwrap();
    assert_eq!(again.outcome, StoreOutcome::AlreadyPresent);
    assert_eq!(payloads(dir.path()), 1);
}

/// The COMMIT of a store never reaches the server (rolled back), and the store cannot tell
/// that from a lost answer, so it keeps the payload. Once the database answers again the
/// running store deletes it: no file without its row, and no restart needed. Before the fix
/// it stayed on disk, uncounted, until the next start-up reconcile.
#[tokio::test]
async fn a_commit_that_never_happened_leaves_no_payload_behind() {
    let Some((store, armed, dir, _server)) = store_behind_a_commit_cutter(Cut::BeforeCommit).await else {
        return;
    };
    store.spawn_access_flusher(Duration::from_millis(20));
    armed.store(true, Ordering::SeqCst);
    let err = store.store("k", &[7u8; 1000][..], &Expected::new(), "").await.unwrap_err();
    assert!(err.is_database(), "{err}");
    assert_eq!(payloads(dir.path()), 1, "kept while the commit's fate is unknown");
    assert_eq!(store.stats().unsettled, 1);

    poll("the uncommitted payload deleted", async || payloads(dir.path()) == 0).await;
    assert_eq!((store.total_bytes().await.unwrap(), store.len().await.unwrap()), (0, 0));
    assert!(store.open_entry("k").await.unwrap().is_none());
    // The key stores normally afterwards.
    store.store("k", &[7u8; 1000][..], &Expected::new(), "").await.unwrap();
    assert_eq!((payloads(dir.path()), store.total_bytes().await.unwrap()), (1, 1000));
}

/// A live row whose payload is gone (however it happened) heals: a read drops the row and its
/// bytes from the total, and a `KeepExisting` store replaces it instead of keeping it.
#[tokio::test]
async fn a_live_row_without_its_payload_is_dropped_by_a_read_and_replaced_by_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open_sqlite(&dir.path().join("metadata.db"), &DatabaseOptions::new()).await.unwrap();
    let store = EntryStore::open(db, "blobs", dir.path(), 1 << 30, OnConflict::KeepExisting).await.unwrap();
    let remove_payloads = || {
        for shard in std::fs::read_dir(dir.path().join("data")).unwrap() {
            for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
                std::fs::remove_file(file.unwrap().path()).unwrap();
            }
        }
    };
    store.store("a", &[1u8; 100][..], &Expected::new(), "").await.unwrap();
    remove_payloads();
    let stored = store.store("a", &[1u8; 100][..], &Expected::new(), "").await.unwrap();
    assert_eq!(stored.outcome, StoreOutcome::Replaced, "a dead row is not kept");
    assert!(store.open_entry("a").await.unwrap().is_some());
    assert_eq!(store.total_bytes().await.unwrap(), 100);

    remove_payloads();
    assert!(store.open_entry("a").await.unwrap().is_none());
    assert_eq!(
        (store.total_bytes().await.unwrap(), store.len().await.unwrap()),
        (0, 0),
        "the read dropped it"
    );
}

/// An adopted file last written long ago, renamed into place while its commit waits for the
/// namespace's lock, must not look like an old orphan to another instance's start-up
/// reconcile. Before the fix the rename kept the old modification time, the reconcile deleted
/// the file, and the row committed without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_beside_an_adopted_file_leaves_it_alone() {
    let Some(server) = pg::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let a_db = Database::connect(server.url(), &DatabaseOptions::new()).await.unwrap();
    let a =
        EntryStore::open(a_db.clone(), "ns", dir.path(), 1 << 30, OnConflict::KeepExisting).await.unwrap();
    // Another session holds the namespace's write lock for a while.
    let mut holder = a_db.pool().begin().await.unwrap();
    sqlx::query("SELECT bytes FROM totals WHERE namespace = 'ns' FOR UPDATE")
        .fetch_one(&mut *holder)
        .await
        .unwrap();

    let spool = dir.path().join("spool-file");
    std::fs::write(&spool, [9u8; 4096]).unwrap();
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&spool).unwrap().set_modified(long_ago).unwrap();
    let storer = {
        let (a, spool) = (a.clone(), spool.clone());
        tokio::spawn(async move { a.store_file("k", &spool, &Expected::new(), "").await })
    };
    // Renamed into data/, its commit waiting for the lock.
    poll("the store's commit waiting", async || lock_waiters(&a_db).await >= 1).await;
    assert_eq!(payloads(dir.path()), 1);
    // Instance C starts: its reconcile walks the directory, then waits for the lock too.
    let c_db = Database::connect(server.url(), &DatabaseOptions::new()).await.unwrap();
    let c = tokio::spawn({
        let dir = dir.path().to_path_buf();
        async move { EntryStore::open(c_db, "ns", &dir, 1 << 30, OnConflict::KeepExisting).await }
    });
    poll("the reconcile's recount waiting", async || lock_waiters(&a_db).await >= 2).await;
    holder.rollback().await.unwrap();
    storer.await.unwrap().unwrap();
    let _c = c.await.unwrap().unwrap();
    assert_eq!(a.total_bytes().await.unwrap(), 4096);
    assert!(a.open_entry("k").await.unwrap().is_some(), "the adopted payload is still there");
}

/// A peer that holds one namespace's lock (stalled, or gone without closing) holds up writes
/// to that namespace only: this process's other caches keep storing. Before the fix the
/// write turn was one per database and every cache queued behind the waiting one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_on_one_namespace_does_not_block_the_others() {
    let Some(server) = pg::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = Database::connect(server.url(), &DatabaseOptions::new()).await.unwrap();
    let blobs =
        EntryStore::open(db.clone(), "blobs", &dir.path().join("b"), 1 << 30, OnConflict::KeepExisting)
            .await
            .unwrap();
    let tags = EntryStore::open(db.clone(), "tags", &dir.path().join("t"), 1 << 30, OnConflict::Replace)
        .await
        .unwrap();
    let other = Database::connect(server.url(), &DatabaseOptions::new()).await.unwrap();
    let mut holder = other.pool().begin().await.unwrap();
    sqlx::query("SELECT bytes FROM totals WHERE namespace = 'blobs' FOR UPDATE")
        .fetch_one(&mut *holder)
        .await
        .unwrap();

    let waiting = tokio::spawn(async move { blobs.store("x", &[1u8; 10][..], &Expected::new(), "").await });
    poll("the blobs store waiting for the lock", async || lock_waiters(&db).await >= 1).await;
    let tagged =
        tokio::time::timeout(Duration::from_secs(5), tags.store("y", &[2u8; 10][..], &Expected::new(), ""))
            .await
            .expect("a store in another namespace must not wait for this lock");
    tagged.unwrap();
    holder.rollback().await.unwrap();
    waiting.await.unwrap().unwrap();
}

/// One interrupted removal whose payload cannot be unlinked (here a directory where the file
/// was) must not stop eviction: passes log it, leave it marked, and evict the rest. Before the
/// fix every pass failed on it first, and the cap stopped holding.
#[tokio::test]
async fn an_unremovable_marked_payload_does_not_stop_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let policy = EvictionPolicy::new(10_000).without_safety_tick();
    let cache = EntryCache::open(CacheOptions::new(dir.path(), "ns", policy)).await.unwrap();
    cache.store("a", &[1u8; 1000][..], &Expected::new(), "").await.unwrap();
    let pool = cache.entries().database().pool().clone();
    let (file,): (String,) =
        sqlx::query_as("SELECT file FROM entries WHERE key = 'a'").fetch_one(&pool).await.unwrap();
    sqlx::query("UPDATE entries SET state = 1 WHERE key = 'a'").execute(&pool).await.unwrap();
    let path = dir.path().join("data").join(&file);
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("x"), b"x").unwrap();
    for i in 0..20u8 {
        cache.store(&format!("k{i}"), &[i; 1000][..], &Expected::new(), "").await.unwrap();
    }
    cache.evictor().evict_now().await.expect("the pass runs despite the unremovable payload");
    let total = cache.total_bytes().await.unwrap();
    assert!(total <= 10_000, "the total came back under the cap: {total}");
}

/// Another instance's start-up reconcile finds a row marked for removal, and before it
/// finishes the removal the remover puts the row back (it found the entry pinned). Before the
/// fix the reconcile unlinked the payload and then deleted the row whatever its state: a live
/// entry lost. Now it deletes only a row still marked, and unlinks only what it deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_leaves_alone_a_row_unmarked_meanwhile() {
    let Some(server) = pg::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let a_db = Database::connect(server.url(), &DatabaseOptions::new()).await.unwrap();
    let a =
        EntryStore::open(a_db.clone(), "ns", dir.path(), 1 << 30, OnConflict::KeepExisting).await.unwrap();
    a.store("k", &[5u8; 1000][..], &Expected::new(), "").await.unwrap();
    sqlx::query("UPDATE entries SET state = 1 WHERE namespace = 'ns' AND key = 'k'")
        .execute(a_db.pool())
        .await
        .unwrap();
    // The remover's session holds the namespace's write lock while it decides.
    let mut remover = a_db.pool().begin().await.unwrap();
    sqlx::query("SELECT bytes FROM totals WHERE namespace = 'ns' FOR UPDATE")
        .fetch_one(&mut *remover)
        .await
        .unwrap();
    let c_db = Database::connect(server.url(), &DatabaseOptions::new()).await.unwrap();
    let c = tokio::spawn({
        let dir = dir.path().to_path_buf();
        async move { EntryStore::open(c_db, "ns", &dir, 1 << 30, OnConflict::KeepExisting).await }
    });
    poll("the reconcile waiting to finish the removal", async || lock_waiters(&a_db).await >= 1).await;
    sqlx::query("UPDATE entries SET state = 0 WHERE namespace = 'ns' AND key = 'k'")
        .execute(&mut *remover)
        .await
        .unwrap();
    remover.commit().await.unwrap();
    let _c = c.await.unwrap().unwrap();
    let mut entry = a.open_entry("k").await.unwrap().expect("the entry put back is still there");
    let mut bytes = Vec::new();
    entry.file.read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes, vec![5u8; 1000]);
    assert_eq!(dunite_testkit::check_consistency(&a, dir.path()).await.unwrap(), 1000);
}
