//! The operator's view of a cache's entries: pages of live entries, most recently used or
//! largest first, with a cursor to continue from.

use super::{EntryStore, to_i64, to_u64};
use crate::{Error, Result};

/// The order of [`EntryStore::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ListOrder {
    /// Most recently stored or read first.
    #[default]
    Recent,
    /// Largest first.
    Size,
}

/// One page of [`EntryStore::list`]: what to ask, and where to continue from.
///
/// # Example
///
/// ```
/// use dunite_core::{ListOrder, ListQuery};
///
/// let first = ListQuery::new(ListOrder::Size, 100);
/// assert_eq!(first.limit(), 100);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    order: ListOrder,
    limit: usize,
    cursor: Option<String>,
}

impl ListQuery {
    /// The largest page [`EntryStore::list`] returns.
    pub const MAX_LIMIT: usize = 1000;

    /// The first page of at most `limit` entries (clamped to 1..=[`MAX_LIMIT`](Self::MAX_LIMIT)).
    #[must_use]
    pub fn new(order: ListOrder, limit: usize) -> Self {
        Self { order, limit: limit.clamp(1, Self::MAX_LIMIT), cursor: None }
    }

    /// The page after the one whose [`ListPage::next`] was `cursor`.
    #[must_use]
    pub fn after(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = Some(cursor.into());
        self
    }

    /// The page size asked for.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// A live entry as [`EntryStore::list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListedEntry {
    /// The entry's key.
    pub key: String,
    /// Payload size.
    pub size: u64,
    /// Last store or read, in microseconds since the Unix epoch (reads are recorded in
    /// batches: those of the last second or so may not show yet).
    pub last_used_us: i64,
    /// When the entry was stored or last refreshed, in milliseconds since the Unix epoch.
    pub stored_at_ms: i64,
    /// Whether an operator pinned it ([`EntryStore::set_pinned`]).
    pub pinned: bool,
    /// The cache kind's own metadata.
    pub meta: String,
}

/// A page of entries and the cursor of the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListPage {
    /// The entries, in the order asked for.
    pub entries: Vec<ListedEntry>,
    /// Pass to [`ListQuery::after`] for the next page; `None` on the last page.
    pub next: Option<String>,
}

type Row = (String, i64, i64, i64, i64, String);

impl EntryStore {
    /// A page of the live entries. Pages are stable under concurrent stores and reads in the
    /// sense that no entry appears twice in one walk by size; a walk by recency may show an
    /// entry again (or miss it) if it is read meanwhile, since reading moves it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a cursor this method did not hand out;
    /// [`Error::Database`].
    pub async fn list(&self, query: &ListQuery) -> Result<ListPage> {
        let inner = self.inner();
        let mut conn = inner.db.acquire().await?;
        // Recency is the version column: write the pending access stamps first.
        inner.flush_accesses_on(&mut conn).await?;
        let (after_value, after_key) = match &query.cursor {
            None => (i64::MAX, String::new()),
            Some(cursor) => parse_cursor(cursor)?,
        };
        let column = match query.order {
            ListOrder::Recent => "version",
            ListOrder::Size => "size",
        };
        // Descending by the column, ascending by key among equals; the cursor is the last
        // row's (value, key). Every column name here is one of two literals.
        let sql = format!(
            "SELECT key, size, version, stored_at, pinned, meta FROM entries \
             WHERE namespace = $1 AND state = 0 AND ({column} < $2 OR ({column} = $2 AND key > $3)) \
             ORDER BY {column} DESC, key LIMIT $4"
        );
        inner.db.round_trip().await;
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&inner.namespace)
            .bind(after_value)
            .bind(after_key)
            .bind(to_i64(query.limit as u64))
            .fetch_all(&mut *conn)
            .await
            .map_err(Error::db("list entries"))?;
        let next = (rows.len() == query.limit).then(|| rows.last()).flatten().map(|last| {
            let value = match query.order {
                ListOrder::Recent => last.2,
                ListOrder::Size => last.1,
            };
            format!("{value}:{}", last.0)
        });
        let entries = rows
            .into_iter()
            .map(|(key, size, version, stored_at_ms, pinned, meta)| ListedEntry {
                key,
                size: to_u64(size),
                last_used_us: version,
                stored_at_ms,
                pinned: pinned != 0,
                meta,
            })
            .collect();
        Ok(ListPage { entries, next })
    }
}

fn parse_cursor(cursor: &str) -> Result<(i64, String)> {
    let bad = || Error::InvalidConfig(format!("bad list cursor {cursor:?}"));
    let (value, key) = cursor.split_once(':').ok_or_else(bad)?;
    Ok((value.parse().map_err(|_| bad())?, key.to_owned()))
}
