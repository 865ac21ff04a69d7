//! Crash safety: whatever step a store is interrupted at, reopening leaves a consistent cache.

use std::time::Duration;

use dunite_testkit::{check_consistency, disk_usage};
use tokio::io::AsyncWriteExt as _;

use crate::{blob, eventually, open, read_verified};

const CAP: u64 = 10 << 20;

/// A store cancelled mid-write (the future dropped) leaves nothing, not even its temporary
/// file.
#[tokio::test]
async fn a_store_cancelled_mid_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), CAP).await;
    let (digest, bytes) = blob(1, 300_000);
    let (mut upstream, reader) = tokio::io::duplex(64 * 1024);
    let task = {
        let (cache, digest) = (cache.clone(), digest.clone());
        tokio::spawn(async move { cache.store_with_size(&digest, 300_000, reader).await })
    };
    upstream.write_all(&bytes[..100_000]).await.unwrap();
    // The temporary file exists and holds data: the store is mid-write.
    let tmp = dir.path().join("tmp");
    eventually(Duration::from_secs(10), || {
        let tmp = tmp.clone();
        async move {
            std::fs::read_dir(&tmp).unwrap().filter_map(Result::ok).any(|e| e.metadata().unwrap().len() > 0)
        }
    })
    .await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(disk_usage(dir.path()).temp_files, 0, "dropping the store removes its temporary file");
    assert!(!cache.contains(&digest).await.unwrap());
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

/// What a `kill -9` can leave at each step of a store (and of a removal), all at once;
/// reopening repairs every one of them.
#[tokio::test]
async fn reopening_after_a_crash_at_any_step_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let mut kept = Vec::new();
    {
        let cache = open(dir.path(), CAP).await;
        for i in 0..6 {
            let (digest, bytes) = blob(10 + i, 50_000 + i as usize);
            cache.store(&digest, &bytes[..]).await.unwrap();
            kept.push(digest);
        }
        cache.entries().entries().flush_accesses().await.unwrap();
    }
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("metadata.db").display()))
        .await
        .unwrap();
    let file_of = |digest: &dunite_oci::Digest| {
        let pool = pool.clone();
        let key = digest.to_string();
        async move {
            let (file,): (String,) = sqlx::query_as("SELECT file FROM entries WHERE key = ?")
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap();
            dir_path_join(&file)
        }
    };
    // Crashed before writing: an empty temporary file.
    std::fs::write(dir.path().join("tmp/store-before"), b"").unwrap();
    // Crashed mid-write: a partial temporary file.
    std::fs::write(dir.path().join("tmp/store-mid"), vec![7u8; 12_345]).unwrap();
    // Crashed after the rename, before the commit: a payload without a row.
    let (orphan, orphan_bytes) = blob(99, 4_321);
    std::fs::create_dir_all(dir.path().join("data/ff")).unwrap();
    std::fs::write(dir.path().join("data/ff/ff00-orphan"), &orphan_bytes).unwrap();
    // Crashed mid-removal, after the mark: a marked row whose file still exists.
    sqlx::query("UPDATE entries SET state = 1 WHERE key = ?")
        .bind(kept[0].to_string())
        .execute(&pool)
        .await
        .unwrap();
    // Crashed mid-removal, after the unlink: a marked row whose file is gone.
    let gone = file_of(&kept[1]).await;
    std::fs::remove_file(dir.path().join("data").join(&gone)).unwrap();
    sqlx::query("UPDATE entries SET state = 1 WHERE key = ?")
        .bind(kept[1].to_string())
        .execute(&pool)
        .await
        .unwrap();
    // A payload lost behind the cache's back: a live row without its file.
    let lost = file_of(&kept[2]).await;
    std::fs::remove_file(dir.path().join("data").join(&lost)).unwrap();
    // And an accounted total that drifted.
    sqlx::query("UPDATE totals SET bytes = bytes + 777, entries = entries + 3").execute(&pool).await.unwrap();
    pool.close().await;

    let cache = open(dir.path(), CAP).await;
    let total = check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
    assert_eq!(cache.len().await.unwrap(), 3);
    for digest in &kept[..3] {
        assert!(cache.open(digest).await.unwrap().is_none(), "{digest} must not be handed out");
    }
    let mut expected_total = 0;
    for digest in &kept[3..] {
        expected_total += read_verified(&cache, digest).await.unwrap().len() as u64;
    }
    assert_eq!(total, expected_total);
    assert!(!cache.contains(&orphan).await.unwrap());
    // The cache works on: the repaired blobs can be stored again.
    let (d, b) = blob(12, 50_002);
    assert_eq!(d, kept[2]);
    cache.store(&d, &b[..]).await.unwrap();
    read_verified(&cache, &d).await.unwrap();
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}

fn dir_path_join(file: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(file)
}
