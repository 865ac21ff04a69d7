//! Fills shared across instances through leases (PostgreSQL): two "instances" here are two
//! stores on one database and one directory, each with its own fills table, as two processes
//! would have. One upstream fetch per key; followers stream the owner's spool and hold the
//! last byte until they verified it; a dead owner's lease is taken over; no lease outlives
//! its fill.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dunite_core::{
    ContentDigest, Database, DatabaseOptions, DigestAlgorithm, EntryStore, Expected, FillError, FillOptions,
    Filling, Fills, OnConflict,
};
use dunite_testkit::{pg, poll_until};
use futures_util::StreamExt as _;

use crate::fill::{read_all, upstream};

const NAMESPACE: &str = "leases";
const LIMIT: Duration = Duration::from_secs(20);

/// One instance: its own database handle and fills table on the shared database and directory.
async fn instance(url: &str, dir: &std::path::Path, timeout: Duration) -> (EntryStore, Fills<String, ()>) {
    let db = Database::connect(url, &DatabaseOptions::new()).await.unwrap();
    let store = EntryStore::open(db, NAMESPACE, dir, 1 << 30, OnConflict::KeepExisting).await.unwrap();
    let fills = Fills::shared(store.clone(), FillOptions::new().with_lease_timeout(timeout));
    (store, fills)
}

fn expecting(bytes: &[u8]) -> Expected {
    Expected::new().with_digest(ContentDigest::of(DigestAlgorithm::Sha256, bytes))
}

fn key_of(bytes: &[u8]) -> String {
    ContentDigest::of(DigestAlgorithm::Sha256, bytes).to_string()
}

/// A fill that must not run: its instance should follow.
fn no_fetch(
    fetches: &Arc<AtomicU32>,
) -> impl FnOnce(Filling<()>) -> std::future::Ready<Result<(), FillError>> + use<> {
    let fetches = Arc::clone(fetches);
    move |_| {
        fetches.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err(FillError::Ended))
    }
}

type BoxedFill = std::pin::Pin<Box<dyn Future<Output = Result<(), FillError>> + Send>>;

/// A fill of `bytes` as `key` in one chunk, counted in `fetches`.
fn fetch_counted(
    key: &str,
    bytes: &[u8],
    fetches: &Arc<AtomicU32>,
) -> impl FnOnce(Filling<()>) -> BoxedFill + use<> {
    let (key, bytes, fetches) = (key.to_owned(), bytes.to_vec(), Arc::clone(fetches));
    move |filling| {
        fetches.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(bytes))]);
            filling.fill(&key, ((), None), stream, |_| String::new()).await
        })
    }
}

async fn lease_rows(url: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM fill_leases").fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

async fn execute(url: &str, sql: &str, key: &str) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).bind(key).execute(&pool).await.unwrap();
    pool.close().await;
}

/// A lease of a (pretend) other instance on `key`, its heartbeat `age` seconds old, spooling to
/// `spool` in the cache's `tmp/`.
async fn foreign_lease(url: &str, key: &str, spool: &str, age_s: u32) {
    let sql = format!(
        "INSERT INTO fill_leases (namespace, key, owner, lease, heartbeat, spool, total) \
         VALUES ('{NAMESPACE}', $1, 'elsewhere/1/0', 1, now() - interval '{age_s} seconds', '{spool}', NULL)"
    );
    execute(url, &sql, key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_misses_a_key_another_fills_follows_its_spool_and_fetches_nothing() {
    let Some(db) = pg::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (a_store, a) = instance(db.url(), dir.path(), Duration::from_secs(15)).await;
    let (b_store, b) = instance(db.url(), dir.path(), Duration::from_secs(15)).await;
    let body = b"the bytes of a popular layer, streamed once".to_vec();
    let key = key_of(&body);

    let (tx, stream) = upstream();
    let total = body.len() as u64;
    let owner_key = key.clone();
    let mut owner = a
        .join(key.clone(), expecting(&body), move |filling| async move {
            filling.fill(&owner_key, ((), Some(total)), stream, |_| String::new()).await
        })
        .unwrap();
    tx.send(Ok(Bytes::copy_from_slice(&body[..10]))).await.unwrap();
    owner.started().await.unwrap();

    let fetches = Arc::new(AtomicU32::new(0));
    let mut follower = b.join(key.clone(), expecting(&body), no_fetch(&fetches)).unwrap();
    assert_eq!(follower.started().await.unwrap().total(), Some(total), "the owner's announced size");
    let mut streamed = follower.body(0, None).boxed();
    // Bytes arrive on the follower while the owner's fill runs: all but the last.
    let first = streamed.next().await.unwrap().unwrap();
    assert_eq!(&first[..], &body[..first.len()]);
    tx.send(Ok(Bytes::copy_from_slice(&body[10..]))).await.unwrap();
    drop(tx);
    let (rest, error) = read_all(streamed).await;
    assert_eq!(error, None);
    assert_eq!([first.to_vec(), rest].concat(), body);
    assert_eq!(owner.finished().await.unwrap().size(), total);
    assert_eq!(fetches.load(Ordering::SeqCst), 0, "the follower asked its upstream");

    // Committed once, readable by both; the lease went with the fill.
    assert!(a_store.contains(&key).await.unwrap() && b_store.contains(&key).await.unwrap());
    poll_until(LIMIT, "the lease released", async || lease_rows(db.url()).await == 0).await;
    // A key whose fill has ended is a new fill: B owns it now.
    let fresh = b"another layer".to_vec();
    let fresh_key = key_of(&fresh);
    let fetches = Arc::new(AtomicU32::new(0));
    let mut joined =
        b.join(fresh_key.clone(), expecting(&fresh), fetch_counted(&fresh_key, &fresh, &fetches)).unwrap();
    joined.finished().await.unwrap();
    assert!(a_store.contains(&fresh_key).await.unwrap());
}

/// A fill that landed on another instance after the caller looked (and missed) is served from
/// the cache, not fetched again: the lease is taken only while the cache does not hold the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_landed_elsewhere_since_the_caller_looked_is_not_fetched_again() {
    let Some(db) = pg::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, a) = instance(db.url(), dir.path(), Duration::from_secs(15)).await;
    let (_, b) = instance(db.url(), dir.path(), Duration::from_secs(15)).await;
    let body = b"a layer that A fetched a moment ago".to_vec();
    let key = key_of(&body);
    let fetches = Arc::new(AtomicU32::new(0));
    let mut first = a.join(key.clone(), expecting(&body), fetch_counted(&key, &body, &fetches)).unwrap();
    first.finished().await.unwrap();
    poll_until(LIMIT, "A's lease released", async || lease_rows(db.url()).await == 0).await;

    // B's client looked before A's fill landed, missed, and joins now.
    let late = b.join(key.clone(), expecting(&body), fetch_counted(&key, &body, &fetches)).unwrap();
    assert_eq!(read_all(late.body(0, None)).await, (body, None));
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "B fetched a blob the cache held");
}

/// The follower hashes what it reads: bytes the owner fails (a digest mismatch) are never
/// completed on the follower; its clients' streams end in an error short of the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_never_completes_a_body_that_does_not_verify() {
    let Some(db) = pg::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, a) = instance(db.url(), dir.path(), Duration::from_secs(15)).await;
    let (b_store, b) = instance(db.url(), dir.path(), Duration::from_secs(15)).await;
    let right = b"the right bytes of this layer".to_vec();
    let wrong = b"the wrong bytes of this layer".to_vec();
    let key = key_of(&right);

    let (tx, stream) = upstream();
    let owner_key = key.clone();
    let mut owner = a
        .join(key.clone(), expecting(&right), move |filling| async move {
            filling.fill(&owner_key, ((), None), stream, |_| String::new()).await
        })
        .unwrap();
    tx.send(Ok(Bytes::copy_from_slice(&wrong[..8]))).await.unwrap();
    owner.started().await.unwrap();
    let fetches = Arc::new(AtomicU32::new(0));
    let mut follower = b.join(key.clone(), expecting(&right), no_fetch(&fetches)).unwrap();
    follower.started().await.unwrap();
    let mut streamed = follower.body(0, None).boxed();
    assert!(!streamed.next().await.unwrap().unwrap().is_empty(), "bytes before the end");
    tx.send(Ok(Bytes::copy_from_slice(&wrong[8..]))).await.unwrap();
    drop(tx);
    assert!(matches!(owner.finished().await, Err(FillError::Invalid(_))));
    let (rest, error) = read_all(streamed).await;
    assert!(error.is_some(), "the follower's client got {} more bytes and no error", rest.len());
    assert!(rest.len() < wrong.len() - 1);
    assert_eq!(fetches.load(Ordering::SeqCst), 0);
    assert!(!b_store.contains(&key).await.unwrap());
    poll_until(LIMIT, "the lease released", async || lease_rows(db.url()).await == 0).await;
}

/// A lease whose owner stopped its heartbeat (killed) is taken over by the next instance to
/// miss the key: the stale row and the dead owner's spool go, and the taker fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owners_lease_is_taken_over_and_its_spool_removed() {
    let Some(db) = pg::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (store, b) = instance(db.url(), dir.path(), Duration::from_secs(2)).await;
    let body = b"bytes a killed instance was spooling".to_vec();
    let key = key_of(&body);
    let dead_spool = dir.path().join("tmp/fill-dead");
    std::fs::write(&dead_spool, &body[..12]).unwrap();
    foreign_lease(db.url(), &key, "fill-dead", 60).await;

    let fetches = Arc::new(AtomicU32::new(0));
    let mut joined = b.join(key.clone(), expecting(&body), fetch_counted(&key, &body, &fetches)).unwrap();
    joined.finished().await.unwrap();
    let (got, error) = read_all(joined.body(0, None)).await;
    assert_eq!((got, error), (body, None));
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    assert!(!dead_spool.exists(), "the dead owner's spool is still there");
    assert!(store.contains(&key).await.unwrap());
    poll_until(LIMIT, "the lease released", async || lease_rows(db.url()).await == 0).await;
}

/// A follower whose owner goes quiet (no heartbeat) fails its clients if it sent them bytes
/// (they came from a spool no one verified), and starts over, taking the lease, if not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_of_an_owner_that_dies_fail_cleanly_or_start_over() {
    let Some(db) = pg::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(600);
    let (store, b) = instance(db.url(), dir.path(), timeout).await;
    let body = b"a layer whose owner is killed mid-fill".to_vec();
    let key = key_of(&body);

    // Bytes sent: the clients fail, nothing is fetched, nothing is stored.
    std::fs::write(dir.path().join("tmp/fill-dying"), &body[..20]).unwrap();
    foreign_lease(db.url(), &key, "fill-dying", 0).await;
    let fetches = Arc::new(AtomicU32::new(0));
    let follower = b.join(key.clone(), expecting(&body), no_fetch(&fetches)).unwrap();
    let (got, error) = read_all(follower.body(0, None)).await;
    assert_eq!(got, body[..19], "every byte of the spool but the last");
    assert!(error.is_some(), "the stream ended without an error");
    assert_eq!(fetches.load(Ordering::SeqCst), 0);
    assert!(!store.contains(&key).await.unwrap());

    // The client's retry takes the lease over and fills.
    let retry = b.join(key.clone(), expecting(&body), fetch_counted(&key, &body, &fetches)).unwrap();
    assert_eq!(read_all(retry.body(0, None)).await, (body.clone(), None));
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    poll_until(LIMIT, "the lease released", async || lease_rows(db.url()).await == 0).await;

    // No byte sent yet (the owner never named a spool): the follower starts over by itself.
    let other = b"a layer whose owner dies before the upstream answers".to_vec();
    let other_key = key_of(&other);
    foreign_lease(db.url(), &other_key, "", 0).await;
    let mut joined =
        b.join(other_key.clone(), expecting(&other), fetch_counted(&other_key, &other, &fetches)).unwrap();
    joined.finished().await.unwrap();
    assert_eq!(read_all(joined.body(0, None)).await, (other, None));
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    assert!(store.contains(&other_key).await.unwrap());
}

/// No lease outlives its fill: released after a failure and after a panic as after a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_released_when_a_fill_fails_or_panics() {
    let Some(db) = pg::fresh_database().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, a) = instance(db.url(), dir.path(), Duration::from_secs(15)).await;
    let body = b"never stored".to_vec();

    let mut refused = a
        .join(key_of(&body), expecting(&body), |_| async { Err(FillError::Refused { status: 404 }) })
        .unwrap();
    assert!(refused.started().await.unwrap_err().is_not_found());
    poll_until(LIMIT, "the failed fill's lease released", async || lease_rows(db.url()).await == 0).await;

    let mut panicked = a
        .join(key_of(&body), expecting(&body), |mut filling: Filling<()>| async move {
            filling.respond((), Some(12)).await?;
            panic!("a fill that panics mid-way");
        })
        .unwrap();
    assert!(matches!(panicked.finished().await, Err(FillError::Ended)));
    poll_until(LIMIT, "the panicked fill's lease released", async || lease_rows(db.url()).await == 0).await;
    let spools = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
    assert_eq!(spools, 0, "a spool left in tmp/");
}
