//! `cargo xtask`: the project's automation, one binary with subcommands.
//!
//! Run with no arguments to list the tasks. It depends on nothing but std so it compiles in
//! seconds.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a command-line tool: printing is its output")]

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const TASKS: &[(&str, &str)] = &[
    ("ci", "every check CI runs: fmt, clippy, build, tests, doc tests, docs (fails on the first failure)"),
    ("bench", "the benchmark scenarios (see docs/benchmarks.md); pass --quick for a smoke run"),
    ("chaos", "crash trials: kill -9 dunite mid-pull, restart, check (see docs/reliability.md); --trials N"),
];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("chaos") => chaos(&args[1..]),
        Some(other) => Err(format!("unknown task `{other}`\n\n{}", usage())),
        None => {
            println!("{}", usage());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
    let tests = if has_nextest() {
        Step::cargo("test", &["nextest", "run", "--workspace", "--all-targets", "--no-fail-fast"])
    } else {
        Step::cargo("test", &["test", "--workspace", "--all-targets", "--no-fail-fast"])
    };
    tests.env("PROPTEST_CASES", &cases).run()?;
    Step::cargo("doctest", &["test", "--workspace", "--doc"]).run()?;
    Step::cargo("doc", &["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings").run()?;
    println!("ci passed in {:.1}s", started.elapsed().as_secs_f32());
    Ok(())
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut cargo_args = vec!["run", "--release", "--quiet", "--package", "dunite-bench", "--"];
    cargo_args.extend(args.iter().map(String::as_str));
    Step::cargo("bench", &cargo_args).run()
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
