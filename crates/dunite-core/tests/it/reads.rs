//! The SQL entry store's read paths: opening what a store just committed.

use dunite_core::{Database, DatabaseOptions, EntryStore, Expected, OnConflict, StoreOutcome};
use tokio::io::AsyncReadExt as _;

async fn store_in(dir: &std::path::Path, on_conflict: OnConflict) -> EntryStore {
    let db = Database::open_sqlite(&dir.join("metadata.db"), &DatabaseOptions::new()).await.unwrap();
    EntryStore::open(db, "reads", dir, 1 << 30, on_conflict).await.unwrap()
}

async fn content(entry: dunite_core::OpenEntry) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut file = entry.file;
    file.read_to_end(&mut bytes).await.unwrap();
    bytes
}

/// `open_stored` opens the committed payload with its row as committed, and looks nothing up:
/// the store's hit and miss counters (which every lookup moves) stay where they were.
#[tokio::test]
async fn open_stored_serves_the_committed_entry_without_a_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path(), OnConflict::Replace).await;
    let stored = store.store("k", &b"first"[..], &Expected::new(), "m1").await.unwrap();
    let before = store.stats();
    let entry = store.open_stored("k", &stored).await.unwrap().expect("just stored");
    assert_eq!((entry.info.size, entry.info.meta.as_str()), (5, "m1"));
    let after = store.stats();
    assert_eq!((after.hits, after.misses), (before.hits, before.misses), "no lookup was made");
    assert_eq!(content(entry).await, b"first");
    // The row as the store committed it, time included.
    assert_eq!(
        store.open_entry("k").await.unwrap().unwrap().info,
        store.open_stored("k", &stored).await.unwrap().unwrap().info
    );
}

/// Once the committed payload is gone, `open_stored` answers what the key holds now: the
/// replacement, or nothing after a removal; and a store that found its key present opens the
/// entry that was kept.
#[tokio::test]
async fn open_stored_falls_back_to_what_the_key_holds_now() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path(), OnConflict::Replace).await;
    let first = store.store("k", &b"first"[..], &Expected::new(), "m1").await.unwrap();
    store.store("k", &b"second"[..], &Expected::new(), "m2").await.unwrap();
    let entry = store.open_stored("k", &first).await.unwrap().expect("the replacement");
    assert_eq!(entry.info.meta, "m2");
    assert_eq!(content(entry).await, b"second");

    store.remove("k").await.unwrap();
    assert!(store.open_stored("k", &first).await.unwrap().is_none());

    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path(), OnConflict::KeepExisting).await;
    store.store("k", &b"same"[..], &Expected::new(), "kept").await.unwrap();
    let again = store.store("k", &b"same"[..], &Expected::new(), "dropped").await.unwrap();
    assert_eq!(again.outcome, StoreOutcome::AlreadyPresent);
    let entry = store.open_stored("k", &again).await.unwrap().expect("the kept entry");
    assert_eq!(entry.info.meta, "kept");
}
