//! What operators steer: pins that eviction never takes (and their cap), pages of entries,
//! and usage per origin; on SQLite and PostgreSQL.

use dunite_core::{CacheOptions, EntryCache, Error, EvictionPolicy, Expected, ListOrder, ListQuery, Pinning};
use dunite_testkit::{TestBackend, check_consistency, test_database};

async fn open(
    backend: TestBackend,
    dir: &std::path::Path,
    cap: u64,
) -> Option<(EntryCache, dunite_testkit::TestDb)> {
    let db = test_database(backend, dir, &dunite_core::DatabaseOptions::new()).await?;
    let options = CacheOptions::new(dir, "ops", EvictionPolicy::new(cap).with_low_watermark(cap / 2))
        .with_database(db.database().clone());
    Some((EntryCache::open(options).await.unwrap(), db))
}

async fn store(cache: &EntryCache, key: &str, size: usize) {
    cache.store(key, &vec![7u8; size][..], &Expected::new(), "").await.unwrap();
}

/// A store of `cap` bytes without an evictor: the entries may exceed the cap (as they do for a
/// while before a pass); the pins may not.
async fn store_without_evictor(
    backend: TestBackend,
    dir: &std::path::Path,
    on_conflict: dunite_core::OnConflict,
) -> Option<(dunite_core::EntryStore, dunite_testkit::TestDb)> {
    let db = test_database(backend, dir, &dunite_core::DatabaseOptions::new()).await?;
    let entries =
        dunite_core::EntryStore::open(db.database().clone(), "ops", dir, 10_000, on_conflict).await.unwrap();
    Some((entries, db))
}

/// A pinned entry, the least recently used of all, survives passes that evict everything else
/// under sustained pressure; unpinned, it is the next to go.
async fn a_pinned_entry_survives_eviction_under_pressure(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((cache, _db)) = open(backend, dir.path(), 10_000).await else { return };
    store(&cache, "pinned", 1_000).await;
    assert_eq!(cache.entries().set_pinned("pinned", Pinning::Pin).await.unwrap(), Some(1_000));
    for round in 0..5 {
        for i in 0..20 {
            store(&cache, &format!("burst-{round}-{i}"), 1_000).await;
        }
        cache.evict_if_over_cap().await.unwrap();
        assert!(cache.contains("pinned").await.unwrap(), "round {round}");
        assert!(cache.total_bytes().await.unwrap() <= 10_000);
    }
    check_consistency(cache.entries(), dir.path()).await.unwrap();
    // Unpinned, it is the least recently used entry again.
    cache.entries().set_pinned("pinned", Pinning::Unpin).await.unwrap();
    for i in 0..10 {
        store(&cache, &format!("after-{i}"), 1_000).await;
    }
    cache.evict_if_over_cap().await.unwrap();
    assert!(!cache.contains("pinned").await.unwrap());
}

#[tokio::test]
async fn a_pinned_entry_survives_eviction_under_pressure_sqlite() {
    a_pinned_entry_survives_eviction_under_pressure(TestBackend::Sqlite).await;
}

#[tokio::test]
async fn a_pinned_entry_survives_eviction_under_pressure_postgres() {
    a_pinned_entry_survives_eviction_under_pressure(TestBackend::Postgres).await;
}

/// Pins never add up to more than the cap; a refused pin changes nothing; unknown keys are
/// `None`; an explicit removal takes a pinned entry too and the accounting stays right.
async fn pins_are_bounded_by_the_cap(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((entries, _db)) =
        store_without_evictor(backend, dir.path(), dunite_core::OnConflict::KeepExisting).await
    else {
        return;
    };
    for key in ["a", "b", "c"] {
        entries.store(key, &vec![7u8; 4_000][..], &Expected::new(), "").await.unwrap();
    }
    entries.set_pinned("a", Pinning::Pin).await.unwrap();
    entries.set_pinned("b", Pinning::Pin).await.unwrap();
    let refused = entries.set_pinned("c", Pinning::Pin).await.unwrap_err();
    assert!(
        matches!(refused, Error::PinsExceedCap { size: 4_000, pinned: 12_000, max_bytes: 10_000 }),
        "{refused:?}"
    );
    assert_eq!(entries.pinned_bytes().await.unwrap(), 8_000);
    assert_eq!(entries.set_pinned("missing", Pinning::Pin).await.unwrap(), None);
    // Pinning twice is a no-op, not a second count against the cap.
    entries.set_pinned("a", Pinning::Pin).await.unwrap();
    assert_eq!(entries.pinned_bytes().await.unwrap(), 8_000);
    assert_eq!(entries.remove("a").await.unwrap(), Some(4_000));
    assert_eq!(entries.pinned_bytes().await.unwrap(), 4_000);
    entries.set_pinned("c", Pinning::Pin).await.unwrap();
    check_consistency(&entries, dir.path()).await.unwrap();
}

#[tokio::test]
async fn pins_are_bounded_by_the_cap_sqlite() {
    pins_are_bounded_by_the_cap(TestBackend::Sqlite).await;
}

#[tokio::test]
async fn pins_are_bounded_by_the_cap_postgres() {
    pins_are_bounded_by_the_cap(TestBackend::Postgres).await;
}

/// A cache reopened with a cap below its pins keeps them and says so: the pass removes what
/// it can and reports no progress rather than spinning or removing a pinned entry.
#[tokio::test]
async fn a_cap_lowered_below_the_pins_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (cache, _db) = open(TestBackend::Sqlite, dir.path(), 10_000).await.unwrap();
        store(&cache, "p1", 3_000).await;
        store(&cache, "p2", 3_000).await;
        store(&cache, "free", 3_000).await;
        cache.entries().set_pinned("p1", Pinning::Pin).await.unwrap();
        cache.entries().set_pinned("p2", Pinning::Pin).await.unwrap();
    }
    let (cache, _db) = open(TestBackend::Sqlite, dir.path(), 4_000).await.unwrap();
    let report = cache.evict_if_over_cap().await.unwrap();
    assert_eq!(report.outcome, dunite_core::PassOutcome::NoProgress, "{report:?}");
    assert!(cache.contains("p1").await.unwrap() && cache.contains("p2").await.unwrap());
    assert!(!cache.contains("free").await.unwrap());
    assert_eq!(cache.entries().pinned_bytes().await.unwrap(), 6_000);
}

/// Pages by size and by recency walk every entry once, in order.
async fn pages_walk_every_entry_once(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((cache, _db)) = open(backend, dir.path(), 1 << 30).await else { return };
    for i in 0..25 {
        store(&cache, &format!("k{i:02}"), 100 + (i % 7)).await;
    }
    for order in [ListOrder::Size, ListOrder::Recent] {
        let mut seen = Vec::new();
        let mut query = ListQuery::new(order, 4);
        for _ in 0..20 {
            let page = cache.entries().list(&query).await.unwrap();
            seen.extend(page.entries);
            match page.next {
                Some(next) => query = ListQuery::new(order, 4).after(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25, "{order:?}");
        let mut keys: Vec<&str> = seen.iter().map(|e| e.key.as_str()).collect();
        if order == ListOrder::Size {
            assert!(seen.windows(2).all(|w| w[0].size >= w[1].size));
        } else {
            assert!(seen.windows(2).all(|w| w[0].last_used_us >= w[1].last_used_us));
            assert_eq!(keys[0], "k24", "the last stored comes first");
        }
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 25);
    }
    assert!(cache.entries().list(&ListQuery::new(ListOrder::Size, 4).after("nonsense")).await.is_err());
}

#[tokio::test]
async fn pages_walk_every_entry_once_sqlite() {
    pages_walk_every_entry_once(TestBackend::Sqlite).await;
}

#[tokio::test]
async fn pages_walk_every_entry_once_postgres() {
    pages_walk_every_entry_once(TestBackend::Postgres).await;
}

/// Usage per origin counts a shared entry for each origin and only the exclusive ones as
/// freeable; entries that are gone stop counting.
async fn usage_per_origin(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((cache, _db)) = open(backend, dir.path(), 1 << 30).await else { return };
    let entries = cache.entries();
    store(&cache, "shared", 1_000).await;
    store(&cache, "a-only", 200).await;
    store(&cache, "b-only", 30).await;
    for (key, origin) in [("shared", "a"), ("shared", "b"), ("a-only", "a"), ("b-only", "b"), ("a-only", "a")]
    {
        entries.record_origin(key, origin);
    }
    let usage = entries.usage_by_origin().await.unwrap();
    let summary: Vec<(&str, u64, u64, u64)> =
        usage.iter().map(|u| (u.origin.as_str(), u.bytes, u.entries, u.exclusive_bytes)).collect();
    assert_eq!(summary, [("a", 1_200, 2, 200), ("b", 1_030, 2, 30)]);
    let (only, shared) = entries.keys_of_origin("a").await.unwrap();
    assert_eq!((only, shared), (vec!["a-only".to_owned()], vec!["shared".to_owned()]));
    cache.remove("shared").await.unwrap();
    let usage = entries.usage_by_origin().await.unwrap();
    let summary: Vec<(&str, u64)> = usage.iter().map(|u| (u.origin.as_str(), u.bytes)).collect();
    assert_eq!(summary, [("a", 200), ("b", 30)]);
}

#[tokio::test]
async fn usage_per_origin_sqlite() {
    usage_per_origin(TestBackend::Sqlite).await;
}

#[tokio::test]
async fn usage_per_origin_postgres() {
    usage_per_origin(TestBackend::Postgres).await;
}

/// The offline check finds a planted orphan, a missing file, a wrong digest, a wrong size, a
/// stray temporary file and a wrong total, changes nothing without repair, and with repair
/// leaves a cache the next check finds clean, with the accounting exact.
#[tokio::test]
async fn the_check_finds_and_repairs_each_kind_of_damage() {
    use std::sync::Arc;

    use dunite_core::{CheckOptions, ContentDigest, DigestAlgorithm, EntryStore, Problem, Repair, Verify};

    let dir = tempfile::tempdir().unwrap();
    let db = {
        let (cache, db) = open(TestBackend::Sqlite, dir.path(), 1 << 30).await.unwrap();
        for (key, byte) in [("good", 1u8), ("gone", 2), ("corrupt", 3), ("short", 4)] {
            let bytes = vec![byte; 1_000];
            cache
                .store(
                    key,
                    &bytes[..],
                    &Expected::new(),
                    &ContentDigest::of(DigestAlgorithm::Sha256, &bytes).to_string(),
                )
                .await
                .unwrap();
        }
        db
    };
    let data = dir.path().join("data");
    let file_of = |byte: u8| {
        walk(&data).into_iter().find(|p| std::fs::read(p).unwrap().first() == Some(&byte)).unwrap()
    };
    std::fs::remove_file(file_of(2)).unwrap();
    let corrupt = file_of(3);
    let mut bytes = std::fs::read(&corrupt).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&corrupt, bytes).unwrap();
    std::fs::write(file_of(4), [4u8; 10]).unwrap();
    std::fs::create_dir_all(data.join("zz")).unwrap();
    std::fs::write(data.join("zz").join("orphan"), b"nobody's").unwrap();
    std::fs::write(dir.path().join("tmp").join("store-stray"), b"x").unwrap();
    sqlx::query("UPDATE totals SET bytes = bytes + 5 WHERE namespace = 'ops'")
        .execute(db.database().pool())
        .await
        .unwrap();

    // The row's metadata says what the payload must hash to.
    let expected: Arc<dunite_core::ExpectedDigest> = Arc::new(|_key: &str, meta: &str| {
        let hex = meta.strip_prefix("sha256:")?;
        ContentDigest::from_bytes(DigestAlgorithm::Sha256, hex::decode(hex).ok()?)
    });
    let store = EntryStore::open_for_check(db.database().clone(), "ops", dir.path()).await.unwrap();
    let options = CheckOptions::new().with_verify(Verify::All, Arc::clone(&expected));
    let report = store.check(&options).await.unwrap();
    let mut kinds: Vec<&str> = report
        .findings
        .iter()
        .map(|f| match &f.problem {
            Problem::MissingFile { key, .. } => {
                assert_eq!(key, "gone");
                "missing"
            }
            Problem::WrongSize { key, .. } => {
                assert_eq!(key, "short");
                "size"
            }
            Problem::WrongDigest { key, .. } => {
                assert_eq!(key, "corrupt");
                "digest"
            }
            Problem::OrphanFile { file, .. } => {
                assert_eq!(file, "zz/orphan");
                "orphan"
            }
            Problem::TempFile { .. } => "temp",
            Problem::WrongTotal { .. } => "total",
            other => panic!("{other:?}"),
        })
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["digest", "missing", "orphan", "size", "temp", "total"], "{report:#?}");
    assert!(!report.is_consistent());
    assert_eq!(report.verified, 1);
    // Without repair, nothing changed.
    assert_eq!(store.check(&options).await.unwrap().findings.len(), 6);

    let repaired = store.check(&options.clone().with_repair(Repair::Yes)).await.unwrap();
    assert!(repaired.is_consistent(), "{repaired:#?}");
    let after = store.check(&options).await.unwrap();
    assert!(after.findings.is_empty(), "{after:#?}");
    assert_eq!((after.rows, after.row_bytes, after.verified), (1, 1_000, 1));
    check_consistency(&store, dir.path()).await.unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

/// A purge (an explicit removal, of a pinned entry too) while the entry is being read: the
/// reader gets every byte it started with, and the accounting drops the entry at once.
#[tokio::test]
async fn a_purge_of_an_entry_being_read_leaves_the_reader_its_bytes() {
    use tokio::io::AsyncReadExt as _;

    let dir = tempfile::tempdir().unwrap();
    let (cache, _db) = open(TestBackend::Sqlite, dir.path(), 1 << 30).await.unwrap();
    let bytes = dunite_testkit::pseudo_random_bytes(7, 3 << 20);
    cache.store("big", &bytes[..], &Expected::new(), "").await.unwrap();
    cache.entries().set_pinned("big", Pinning::Pin).await.unwrap();
    let mut entry = cache.open_entry("big").await.unwrap().unwrap();
    let mut head = vec![0u8; 1_000];
    entry.file.read_exact(&mut head).await.unwrap();

    assert_eq!(cache.remove("big").await.unwrap(), Some(bytes.len() as u64));
    assert_eq!((cache.total_bytes().await.unwrap(), cache.len().await.unwrap()), (0, 0));
    assert!(cache.open_entry("big").await.unwrap().is_none());
    let mut rest = Vec::new();
    entry.file.read_to_end(&mut rest).await.unwrap();
    head.extend(rest);
    assert!(head == bytes, "the reader's bytes changed");
    check_consistency(cache.entries(), dir.path()).await.unwrap();
}

/// A pin that commits after a pass selected the entry, before the pass removes it, still
/// keeps it: the removal's mark requires the entry unpinned.
async fn a_pin_between_selection_and_removal_holds(backend: TestBackend) {
    use dunite_core::{EvictionPass as _, EvictionStore as _, Removal};

    let dir = tempfile::tempdir().unwrap();
    let Some((cache, _db)) = open(backend, dir.path(), 1 << 30).await else { return };
    store(&cache, "first", 100).await;
    store(&cache, "second", 100).await;
    // On PostgreSQL the cache's own evictor may hold the eviction lock (a pass after the
    // stores): wait for its pass to end, then take the lock.
    let mut pass = None;
    for _ in 0..50 {
        pass = cache.entries().begin_pass().await.unwrap();
        if pass.is_some() {
            break;
        }
        cache.evict_if_over_cap().await.unwrap();
    }
    let mut pass = pass.expect("the eviction lock, once the evictor's pass is over");
    let victims = pass.least_recently_used(10).await.unwrap();
    assert_eq!(victims.len(), 2);
    cache.entries().set_pinned("first", Pinning::Pin).await.unwrap();
    let removals = pass.remove_batch(&victims).await.unwrap();
    pass.finish().await.unwrap();
    assert_eq!((victims[0].key.as_str(), removals[0]), ("first", Removal::Skipped));
    // The other victim is removed, by this pass or (on SQLite, where passes do not exclude
    // each other) by the evictor's own pass finishing the removal this one marked.
    assert!(cache.contains("first").await.unwrap());
    assert!(!cache.contains("second").await.unwrap());
    check_consistency(cache.entries(), dir.path()).await.unwrap();
}

#[tokio::test]
async fn a_pin_between_selection_and_removal_holds_sqlite() {
    a_pin_between_selection_and_removal_holds(TestBackend::Sqlite).await;
}

#[tokio::test]
async fn a_pin_between_selection_and_removal_holds_postgres() {
    a_pin_between_selection_and_removal_holds(TestBackend::Postgres).await;
}

/// A purge whose removal is interrupted after its mark (the payload's deletion fails) and a
/// store of the same key that takes the marked row over: the new entry is not pinned, since
/// the pin went with the purged entry.
#[tokio::test]
async fn a_store_over_a_purged_pinned_entry_is_not_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, db) = open(TestBackend::Sqlite, dir.path(), 1 << 30).await.unwrap();
    let entries = cache.entries();
    store(&cache, "k", 100).await;
    entries.set_pinned("k", Pinning::Pin).await.unwrap();
    entries.faults().fail_unlinks(1);
    assert!(cache.remove("k").await.is_err(), "the deletion fails after the mark");
    // The check sees the half-done removal once (not its payload as an orphan too).
    let checked =
        dunite_core::EntryStore::open_for_check(db.database().clone(), "ops", dir.path()).await.unwrap();
    let report = checked.check(&dunite_core::CheckOptions::new()).await.unwrap();
    let problems: Vec<_> = report.findings.iter().map(|f| f.problem.clone()).collect();
    assert_eq!(problems, [dunite_core::Problem::UnfinishedRemoval { key: "k".to_owned() }]);
    store(&cache, "k", 100).await;
    assert_eq!(entries.pinned_bytes().await.unwrap(), 0);
    let page = entries.list(&ListQuery::new(ListOrder::Recent, 10)).await.unwrap();
    assert_eq!(page.entries.len(), 1);
    assert!(!page.entries[0].pinned);
}

/// A pinned entry replaced by a larger body (a download revalidated) keeps its pin only if
/// the pins still fit the cap: a replacement that grows drops the pin, so the pins never hold
/// the cache over its cap.
async fn a_replacement_that_grows_drops_its_pin(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((entries, _db)) =
        store_without_evictor(backend, dir.path(), dunite_core::OnConflict::Replace).await
    else {
        return;
    };
    entries.store("a", &vec![7u8; 6_000][..], &Expected::new(), "").await.unwrap();
    entries.store("b", &vec![7u8; 3_000][..], &Expected::new(), "").await.unwrap();
    entries.set_pinned("a", Pinning::Pin).await.unwrap();
    entries.set_pinned("b", Pinning::Pin).await.unwrap();
    entries.store("a", &vec![8u8; 9_000][..], &Expected::new(), "").await.unwrap();
    assert!(entries.pinned_bytes().await.unwrap() <= 10_000, "the pins hold the cache over its cap");
    // A replacement that does not grow keeps its pin.
    entries.store("b", &vec![8u8; 2_000][..], &Expected::new(), "").await.unwrap();
    assert_eq!(entries.pinned_bytes().await.unwrap(), 2_000);
    check_consistency(&entries, dir.path()).await.unwrap();
}

#[tokio::test]
async fn a_replacement_that_grows_drops_its_pin_sqlite() {
    a_replacement_that_grows_drops_its_pin(TestBackend::Sqlite).await;
}

#[tokio::test]
async fn a_replacement_that_grows_drops_its_pin_postgres() {
    a_replacement_that_grows_drops_its_pin(TestBackend::Postgres).await;
}
