//! `cargo xtask`: the project's automation, one binary with subcommands.
//!
//! Run with no arguments to list the tasks. It depends on nothing but std so it compiles in
//! seconds.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a command-line tool: printing is its output")]

mod fuzz;
mod pg;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use pg::Cluster;

const TASKS: &[(&str, &str)] = &[
    ("ci", "every check CI runs: fmt, clippy, build, tests, doc tests, docs (fails on the first failure)"),
    ("bench", "the benchmark scenarios (see docs/benchmarks.md); pass --quick for a smoke run"),
    ("chaos", "crash trials: kill -9 dunite mid-pull, restart, check (see docs/reliability.md); --trials N"),
    (
        "fuzz",
        "libFuzzer on the cargo-fuzz targets in fuzz/ (needs nightly + cargo-fuzz); --seconds N [TARGET...]",
    ),
    ("pg", "a throwaway PostgreSQL server: `pg -- CMD ARGS...` runs CMD with it; bare `pg` prints its env"),
];

/// The test server's URL. `ci`, `bench` and `pg` start a throwaway server and set it, unless it
/// is already set (then they use that server and start none).
const DATABASE_URL_VAR: &str = "DUNITE_TEST_DATABASE_URL";
/// Space-separated `pg_ctl` command line for the test server (see `Cluster::ctl_prefix`), so
/// tests can stop and start it. Set only for a server we started.
const PG_CTL_VAR: &str = "DUNITE_TEST_PG_CTL";
/// Set to 1 for the test steps of `ci`: tests needing PostgreSQL fail instead of skipping.
const REQUIRE_POSTGRES_VAR: &str = "DUNITE_REQUIRE_POSTGRES";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci().map(|()| ExitCode::SUCCESS),
        Some("bench") => bench(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("chaos") => chaos(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("fuzz") => fuzz::fuzz(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("pg") => pg(&args[1..]),
        Some(other) => Err(format!("unknown task `{other}`\n\n{}", usage())),
        None => {
            println!("{}", usage());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    let mut text = String::from("usage: cargo xtask <task>\n\ntasks:\n");
    for (name, help) in TASKS {
        text.push_str(&format!("  {name:<8} {help}\n"));
    }
    text
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

/// One step of a task: a command, run from the workspace root, with a one-line summary.
struct Step {
    name: &'static str,
    command: Command,
}

impl Step {
    fn cargo(name: &'static str, args: &[&str]) -> Self {
        let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        command.args(args).current_dir(root());
        Self { name, command }
    }

    fn env(mut self, key: &str, value: &str) -> Self {
        self.command.env(key, value);
        self
    }

    /// Point the step at the test server: `server`'s variables, when we started one.
    fn postgres(mut self, server: &TestServer) -> Self {
        server.apply(&mut self.command);
        self
    }

    fn run(mut self) -> Result<(), String> {
        let started = Instant::now();
        eprintln!("xtask: {:<10} running {:?}", self.name, self.command);
        let status = self.command.status().map_err(|e| format!("{}: cannot start: {e}", self.name))?;
        let took = started.elapsed().as_secs_f32();
        if status.success() {
            println!("ok     {:<10} {took:>7.1}s", self.name);
            Ok(())
        } else {
            println!("FAILED {:<10} {took:>7.1}s ({status})", self.name);
            Err(format!("step `{}` failed", self.name))
        }
    }
}

/// Test modules whose tests must run by themselves (timing-sensitive, or stopping the shared
/// PostgreSQL server); the same set as the override in `.config/nextest.toml`.
const ALONE: [&str; 3] = ["pool::", "burst::", "pg_restart::"];

fn has_nextest() -> bool {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn ci() -> Result<(), String> {
    // Proptest suites run more cases in CI than in a developer's `cargo test`.
    let cases = env::var("PROPTEST_CASES").unwrap_or_else(|_| "256".into());
    let started = Instant::now();
    Step::cargo("fmt", &["fmt", "--all", "--check"]).run()?;
    Step::cargo("clippy", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]).run()?;
    // The end-to-end tests run the real `dunite` binary; test builds do not produce it.
    Step::cargo("build", &["build", "--workspace", "--bins"]).run()?;
    // Dropped, stopping the server, when this function returns, by an error included.
    let server = TestServer::start()?;
    println!("postgres   {}", server.describe());
    let tests = if has_nextest() {
        // .config/nextest.toml runs the tests that must run alone (ALONE) by themselves.
        vec![Step::cargo("test", &["nextest", "run", "--workspace", "--all-targets", "--no-fail-fast"])]
    } else {
        // Without nextest: the rest in parallel, then those one at a time, by themselves.
        let mut rest = vec!["test", "--workspace", "--all-targets", "--no-fail-fast", "--"];
        for module in ALONE {
            rest.extend(["--skip", module]);
        }
        let mut alone = vec!["test", "--workspace", "--all-targets", "--no-fail-fast", "--"];
        alone.extend(ALONE);
        alone.push("--test-threads=1");
        vec![Step::cargo("test", &rest), Step::cargo("test-alone", &alone)]
    };
    for step in tests {
        step.env("PROPTEST_CASES", &cases).postgres(&server).env(REQUIRE_POSTGRES_VAR, "1").run()?;
    }
    Step::cargo("doctest", &["test", "--workspace", "--doc"])
        .postgres(&server)
        .env(REQUIRE_POSTGRES_VAR, "1")
        .run()?;
    Step::cargo("doc", &["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings").run()?;
    println!("ci passed in {:.1}s", started.elapsed().as_secs_f32());
    Ok(())
}

fn bench(args: &[String]) -> Result<(), String> {
    // The http scenario runs the real server binary, which `cargo run` of the bench does not
    // build.
    Step::cargo("build", &["build", "--release", "--quiet", "--package", "dunite"]).run()?;
    let mut cargo_args = vec!["run", "--release", "--quiet", "--package", "dunite-bench", "--"];
    cargo_args.extend(args.iter().map(String::as_str));
    // The benchmarks have a PostgreSQL scenario.
    let server = TestServer::start()?;
    Step::cargo("bench", &cargo_args).postgres(&server).run()
}

/// Build the binary, then run the crash-trial test alone with `DUNITE_CHAOS_TRIALS` trials; the
/// test prints the summary line (`chaos: N trials, V violations ...`).
fn chaos(args: &[String]) -> Result<(), String> {
    let trials = match args {
        [] => "100".to_owned(),
        [flag, n] if flag == "--trials" => {
            n.parse::<u64>().map_err(|_| format!("--trials takes a number, got `{n}`"))?.to_string()
        }
        _ => return Err("usage: cargo xtask chaos [--trials N]".into()),
    };
    Step::cargo("build", &["build", "-p", "dunite"]).run()?;
    Step::cargo("chaos", &["test", "-p", "dunite-tests", "--test", "it", "chaos", "--", "--nocapture"])
        .env("DUNITE_CHAOS_TRIALS", &trials)
        .run()
}

/// `cargo xtask pg [--] [COMMAND ARGS...]`: start a throwaway server (or use
/// `DUNITE_TEST_DATABASE_URL`'s); run COMMAND with the server's variables set and exit with its
/// status, or, with no command, print the variables as `export` lines and keep the server until
/// stdin closes.
fn pg(args: &[String]) -> Result<ExitCode, String> {
    let args = args.strip_prefix(&["--".to_owned()]).unwrap_or(args);
    let server = TestServer::start()?;
    let Some((program, program_args)) = args.split_first() else {
        match &server {
            TestServer::Ours(cluster) => {
                println!("export {DATABASE_URL_VAR}={}", cluster.url());
                println!("export {PG_CTL_VAR}='{}'", cluster.ctl_prefix());
            }
            TestServer::Theirs => eprintln!("xtask: pg         {DATABASE_URL_VAR} is already set"),
        }
        eprintln!("xtask: pg         the server runs until stdin closes (Ctrl-D)");
        std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())
            .map_err(|e| format!("reading stdin: {e}"))?;
        return Ok(ExitCode::SUCCESS);
    };
    let mut command = Command::new(program);
    command.args(program_args);
    server.apply(&mut command);
    let status = command.status().map_err(|e| format!("cannot run `{program}`: {e}"))?;
    // The exit code of COMMAND, or 128 + the signal that killed it, as a shell reports it.
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt as _;
        128 + status.signal().unwrap_or(0)
    });
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// The PostgreSQL server tests run against: one given in the environment, or one we started
/// (stopped when this is dropped).
enum TestServer {
    /// `DUNITE_TEST_DATABASE_URL` was set: steps inherit it (and `DUNITE_TEST_PG_CTL`, if set).
    Theirs,
    /// A throwaway cluster of ours.
    Ours(Cluster),
}

impl TestServer {
    fn start() -> Result<Self, String> {
        match env::var(DATABASE_URL_VAR) {
            Ok(url) if !url.is_empty() => Ok(Self::Theirs),
            _ => Cluster::start(&root()).map(Self::Ours),
        }
    }

    /// One line saying which server: our URL, but not theirs, which may hold a password.
    fn describe(&self) -> String {
        match self {
            Self::Theirs => format!("the server in ${DATABASE_URL_VAR}"),
            Self::Ours(cluster) => cluster.url(),
        }
    }

    /// Set the server's variables on `command`.
    fn apply(&self, command: &mut Command) {
        if let Self::Ours(cluster) = self {
            command.env(DATABASE_URL_VAR, cluster.url()).env(PG_CTL_VAR, cluster.ctl_prefix());
        }
    }
}
