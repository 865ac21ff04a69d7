//! The PostgreSQL test server: its URL, fresh databases on it, and stopping and starting it.
//!
//! `cargo xtask ci` (and `cargo xtask pg -- COMMAND`) start a throwaway server and describe it
//! to the tests in the environment:
//!
//! - `DUNITE_TEST_DATABASE_URL`: the server's URL, as a superuser
//!   (`postgres://dunite@127.0.0.1:<port>/postgres`). Tests that need PostgreSQL skip when it
//!   is unset, unless `DUNITE_REQUIRE_POSTGRES` or `CI` is set, when they fail.
//! - `DUNITE_TEST_PG_CTL`: a space-separated `pg_ctl` command line for the server, to which
//!   [`stop_server`] and [`start_server`] append their arguments. Set only for a server `xtask`
//!   started.
//!
//! Every test should work in a database of its own ([`fresh_database`]): tests run in
//! parallel against the one server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{AssertSqlSafe, Connection as _, Executor as _, PgConnection};

/// The variable holding the test server's URL.
const DATABASE_URL_VAR: &str = "DUNITE_TEST_DATABASE_URL";
/// The variable holding the `pg_ctl` command line for the test server.
const PG_CTL_VAR: &str = "DUNITE_TEST_PG_CTL";
/// How long dropping a [`TestDatabase`] waits for the server before giving up on the drop.
const DROP_TIMEOUT: Duration = Duration::from_secs(30);

/// The test server's URL: `DUNITE_TEST_DATABASE_URL`, or `None` when it is unset (the caller
/// skips its test).
///
/// # Panics
///
/// When it is unset but `DUNITE_REQUIRE_POSTGRES` or `CI` is set (to anything but empty, `0`
/// or `false`): there a missing server is a failure, not a reason to skip.
#[must_use]
pub fn server_url() -> Option<String> {
    if let Some(url) = non_empty_var(DATABASE_URL_VAR) {
        return Some(url);
    }
    let required = ["DUNITE_REQUIRE_POSTGRES", "CI"].into_iter().find(|name| is_truthy(name));
    if let Some(name) = required {
        panic!(
            "{name} is set, so this test needs PostgreSQL, but {DATABASE_URL_VAR} is not set. Run the \
             tests with `cargo xtask ci`, or `cargo xtask pg -- cargo nextest run ...` (or `cargo \
             xtask pg -- cargo test ...`), which start a throwaway server and set it; or set \
             {DATABASE_URL_VAR} to a server where the user may create databases."
        );
    }
    None
}

/// A database of its own for one test, on the test server. Dropped (`DROP DATABASE ... WITH
/// (FORCE)`, closing connections still open to it) when this guard drops, best effort.
#[derive(Debug)]
pub struct TestDatabase {
    server: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// The database's URL (the server's URL with the database's name as its path).
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    /// On a thread of its own with its own runtime, joined, so it works from inside a runtime
    /// (where blocking on one is not allowed) and outside one alike.
    fn drop(&mut self) {
        let server = self.server.clone();
        let statement = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async {
                let drop_it = async {
                    let mut conn = PgConnection::connect(&server).await?;
                    conn.execute(AssertSqlSafe(statement)).await?;
                    conn.close().await
                };
                // Errors (a stopped server, say) are ignored: the server is throwaway.
                let _ = tokio::time::timeout(DROP_TIMEOUT, drop_it).await;
            });
        });
        let _ = dropper.join();
    }
}

/// Create a fresh, uniquely named database (`dunite_t_<pid>_<counter>_<nanos>`) on the test
/// server; `None` when there is no server (see [`server_url`]).
///
/// # Panics
///
/// When [`server_url`] does, or the server refuses the connection or the `CREATE DATABASE`.
pub async fn fresh_database() -> Option<TestDatabase> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let server = server_url()?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos());
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("dunite_t_{}_{counter}_{nanos}", std::process::id());
    let mut conn = PgConnection::connect(&server)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server ({DATABASE_URL_VAR}): {e}"));
    // The name is ours: digits and underscores only.
    conn.execute(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
    let _ = conn.close().await;
    let url = with_database(&server, &name);
    Some(TestDatabase { server, name, url })
}

/// Whether tests may stop and start the test server: `DUNITE_TEST_PG_CTL` is set.
///
/// # Panics
///
/// When it is unset under `CI` (where `cargo xtask ci` always starts a server of its own):
/// a restart test must not pass there without running. Elsewhere (a server of the user's,
/// given by `DUNITE_TEST_DATABASE_URL`) such tests skip.
#[must_use]
pub fn can_restart() -> bool {
    let can = non_empty_var(PG_CTL_VAR).is_some();
    assert!(
        can || !is_truthy("CI"),
        "CI is set, so the PostgreSQL restart tests must run, but {PG_CTL_VAR} is not set: run them \
         through `cargo xtask ci` or `cargo xtask pg -- ...`, which start a server they may restart"
    );
    can
}

/// Stop the test server (`pg_ctl ... stop -m fast -w -t 60`), waiting until it is down. Every
/// test running against the server sees it go: a test calling this must not share the server
/// with tests running at the same time. Blocks the calling thread.
///
/// # Panics
///
/// When `DUNITE_TEST_PG_CTL` is unset (check [`can_restart`] first), or `pg_ctl` fails.
pub fn stop_server() {
    pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
}

/// Start the test server again after [`stop_server`] (`pg_ctl ... start -w -t 60`), waiting
/// until it accepts connections. It comes back on the same port with the same settings.
/// Blocks the calling thread.
///
/// # Panics
///
/// When `DUNITE_TEST_PG_CTL` is unset (check [`can_restart`] first), or `pg_ctl` fails.
pub fn start_server() {
    pg_ctl(&["start", "-w", "-t", "60"]);
}

/// Run `DUNITE_TEST_PG_CTL` (split on whitespace) with `args` appended.
fn pg_ctl(args: &[&str]) {
    let Some(prefix) = non_empty_var(PG_CTL_VAR) else {
        panic!(
            "{PG_CTL_VAR} is not set, so the test server cannot be stopped or started (check \
             dunite_testkit::pg::can_restart() first; `cargo xtask ci` and `cargo xtask pg` set it)"
        );
    };
    let mut words = prefix.split_whitespace();
    let program = words.next().expect("non-empty, so it has a first word");
    // Its output is not captured: without `-l` in the prefix the server would inherit a
    // capturing pipe and hold it open. pg_ctl's errors go to stderr, visible in the test's output.
    let status = std::process::Command::new(program)
        .args(words)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {PG_CTL_VAR} ({prefix}): {e}"));
    assert!(status.success(), "`{prefix} {}` failed: {status}", args.join(" "));
}

/// `server` (a `postgres://` URL) with its database, the path, replaced by `database`; any
/// query string is kept.
fn with_database(server: &str, database: &str) -> String {
    let (base, query) = server.split_once('?').map_or((server, None), |(base, query)| (base, Some(query)));
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    let mut url = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// The variable's value, when set and not empty.
fn non_empty_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// Whether the variable is set to something other than empty, `0` or `false`.
fn is_truthy(name: &str) -> bool {
    non_empty_var(name).is_some_and(|value| value != "0" && !value.eq_ignore_ascii_case("false"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_replaces_the_path() {
        let cases = [
            ("postgres://dunite@127.0.0.1:5432/postgres", "postgres://dunite@127.0.0.1:5432/db"),
            ("postgres://u:p@h:1/postgres?sslmode=disable", "postgres://u:p@h:1/db?sslmode=disable"),
            ("postgres://u@h", "postgres://u@h/db"),
            ("postgresql://h/?application_name=x", "postgresql://h/db?application_name=x"),
        ];
        for (server, expected) in cases {
            assert_eq!(with_database(server, "db"), expected, "{server}");
        }
    }

    #[tokio::test]
    async fn fresh_database_is_usable() {
        let Some(db) = fresh_database().await else {
            return; // No test server, and none required.
        };
        let mut conn = PgConnection::connect(db.url()).await.expect("connect to the fresh database");
        let (one, name): (i32, String) =
            sqlx::query_as("SELECT 1, current_database()").fetch_one(&mut conn).await.expect("SELECT 1");
        assert_eq!((one, name.as_str()), (1, db.name()));
        // Left open on purpose: the drop must force it closed.
        let name = db.name().to_owned();
        drop(db);

        let server = server_url().expect("a server, since there was a database");
        let mut admin = PgConnection::connect(&server).await.expect("connect to the server");
        let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .expect("count databases");
        assert_eq!(left, 0, "database {name} still exists after its guard dropped");
        drop(conn);
    }
}
