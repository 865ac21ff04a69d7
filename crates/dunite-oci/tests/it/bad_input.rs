//! Bad input the blob cache alone has: malformed digests, a dead or locked database, corrupted
//! payloads, files stored in place. The bad input every cache refuses is `contract::bad_input`.

use dunite_core::Error as CoreError;
use dunite_oci::{Digest, DigestError, Error};
use dunite_testkit::{check_consistency, disk_usage};

use crate::{blob, open, read_verified};

fn core(result: Result<dunite_core::Stored, Error>) -> CoreError {
    match result {
        Err(Error::Cache(e)) => e,
        other => panic!("expected a cache error, got {other:?}"),
    }
}

#[test]
fn malformed_digests_are_typed_errors() {
    for input in ["", "sha256", "sha256:", "md5:00", "sha256:xyz", "sha256:/etc/passwd", "sha384:ab"] {
        let err = input.parse::<Digest>().unwrap_err();
        let wrapped: Error = err.clone().into();
        assert!(matches!(wrapped, Error::InvalidDigest(_)));
        assert!(!err.to_string().is_empty());
    }
    assert!(matches!("sha256:abc".parse::<Digest>(), Err(DigestError::WrongLength { .. })));
}

/// The database dies between the write and the commit: a typed error, and the payload that
/// was already renamed into place is deleted again.
#[tokio::test]
async fn a_dead_database_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let (cached, cached_bytes) = blob(9, 20_000);
    cache.store(&cached, &cached_bytes[..]).await.unwrap();
    let before = disk_usage(dir.path());
    cache.entries().entries().database().pool().close().await;
    let (digest, bytes) = blob(8, 10_000);
    let err = core(cache.store(&digest, &bytes[..]).await);
    assert!(matches!(err, CoreError::Database { .. }), "{err}");
    assert_eq!(disk_usage(dir.path()), before, "no payload or temporary file may remain");
    // Reads go to the disk instead, and hand out only bytes that match the digest.
    assert!(cache.open(&digest).await.unwrap().is_none(), "never stored");
    assert_eq!(read_verified(&cache, &cached).await.as_deref(), Some(&cached_bytes[..]));
}

/// Without the database, a payload on disk whose bytes do not match the digest (corrupted,
/// say) is never handed out.
#[tokio::test]
async fn without_the_database_only_verified_bytes_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let (digest, bytes) = blob(10, 20_000);
    cache.store(&digest, &bytes[..]).await.unwrap();
    cache.entries().entries().database().pool().close().await;
    assert!(cache.open(&digest).await.unwrap().is_some(), "the intact payload is served");
    let data = dir.path().join("data");
    for shard in std::fs::read_dir(&data).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let mut corrupted = std::fs::read(&path).unwrap();
            corrupted[0] ^= 1;
            std::fs::write(&path, corrupted).unwrap();
        }
    }
    assert!(cache.open(&digest).await.unwrap().is_none(), "corrupted bytes must not be served");
}

/// A blob already on disk is verified in place and moved in; a wrong one stays where it is and
/// nothing is stored.
#[tokio::test]
async fn storing_a_file_moves_it_in_only_when_it_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20).await;
    let spool = dir.path().join("spool-file");
    let (digest, bytes) = blob(9, 50_000);
    let (other, _) = blob(10, 50_000);
    std::fs::write(&spool, &bytes).unwrap();

    let err = core(cache.store_file_with_size(&other, 50_000, &spool).await);
    assert!(matches!(err, CoreError::DigestMismatch { .. }), "{err}");
    assert!(spool.exists(), "a file that fails verification is left alone");
    assert_eq!(cache.total_bytes().await.unwrap(), 0);

    cache.store_file_with_size(&digest, 50_000, &spool).await.unwrap();
    assert!(!spool.exists(), "the verified file was moved into the cache");
    let mut read = cache.open(&digest).await.unwrap().unwrap();
    let mut got = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(read.file_mut(), &mut got).await.unwrap();
    assert_eq!(got, bytes);
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

/// Another process holds SQLite's write lock (`BEGIN EXCLUSIVE`) mid-burst: stores fail with a
/// typed database error after the busy timeout and leave nothing behind, cached blobs still
/// read back (WAL readers are not blocked), the evictor lives on, and once the lock is gone
/// the cache takes stores again and converges under its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_database_fails_stores_cleanly_and_recovers() {
    use sqlx::Connection as _;
    const SIZE: usize = 10_000;
    const CAP: u64 = 8 * SIZE as u64;
    let dir = tempfile::tempdir().unwrap();
    let options =
        dunite_core::DatabaseOptions::new().with_busy_timeout(std::time::Duration::from_millis(100));
    let policy = dunite_core::EvictionPolicy::new(CAP).without_safety_tick();
    let cache = crate::open_with(dir.path(), policy, options).await;
    let mut cached = Vec::new();
    for seed in 0..4 {
        let (digest, bytes) = blob(1_000 + seed, SIZE);
        cache.store(&digest, &bytes[..]).await.unwrap();
        cached.push(digest);
    }
    let before = disk_usage(dir.path());

    let path = dir.path().join("metadata.db");
    let mut holder =
        sqlx::SqliteConnection::connect_with(&sqlx::sqlite::SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
    sqlx::raw_sql("BEGIN EXCLUSIVE").execute(&mut holder).await.unwrap();
    for seed in 0..4 {
        let (digest, bytes) = blob(2_000 + seed, SIZE);
        let err = core(cache.store(&digest, &bytes[..]).await);
        assert!(matches!(err, CoreError::Database { .. }), "{err}");
    }
    assert_eq!(disk_usage(dir.path()), before, "a failed store left a file");
    for digest in &cached {
        assert!(read_verified(&cache, digest).await.is_some(), "cached blobs stay readable");
    }
    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();

    for seed in 0..12 {
        let (digest, bytes) = blob(3_000 + seed, SIZE);
        cache.store(&digest, &bytes[..]).await.unwrap();
    }
    crate::eventually(std::time::Duration::from_secs(30), || async {
        cache.total_bytes().await.unwrap() <= CAP
    })
    .await;
    cache.evict_if_over_cap().await.unwrap();
    assert!(check_consistency(cache.entries().entries(), dir.path()).await.unwrap() <= CAP);
}
