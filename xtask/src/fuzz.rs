//! `cargo xtask fuzz`: run the cargo-fuzz targets in `fuzz/` with libFuzzer, each for a time
//! budget, and report runs and coverage per target.
//!
//! Needs a nightly toolchain (`rustup toolchain list`) and cargo-fuzz (`cargo +nightly install
//! cargo-fuzz`); CI has neither guaranteed, so `cargo xtask ci` does not run this: it runs the
//! same checks under proptest (`tests/it/hostile.rs`) and every seed in `fuzz/seeds/`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::root;

/// What one target's run printed at its end.
struct Outcome {
    target: String,
    runs: u64,
    seconds: u64,
    coverage: u64,
    corpus: usize,
}

/// `cargo xtask fuzz [--seconds N] [TARGET...]`: all targets when none is named; 60 s each.
pub(crate) fn fuzz(args: &[String]) -> Result<(), String> {
    let mut seconds = 60u64;
    let mut chosen = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--seconds" {
            let n = args.next().ok_or("--seconds takes a number")?;
            seconds = n.parse().map_err(|_| format!("--seconds takes a number, got `{n}`"))?;
        } else {
            chosen.push(arg.clone());
        }
    }
    let dir = root().join("fuzz");
    let mut targets: Vec<String> = fs::read_dir(dir.join("fuzz_targets"))
        .map_err(|e| format!("fuzz/fuzz_targets: {e}"))?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    targets.sort();
    if let Some(unknown) = chosen.iter().find(|t| !targets.contains(t)) {
        return Err(format!("no fuzz target `{unknown}`; there are: {}", targets.join(", ")));
    }
    if !chosen.is_empty() {
        targets = chosen;
    }
    nightly(&["fuzz", "--version"]).map_err(|e| {
        format!("{e}\ncargo xtask fuzz needs a nightly toolchain with cargo-fuzz: `cargo +nightly install cargo-fuzz`")
    })?;

    let started = Instant::now();
    let status =
        nightly_command(&["fuzz", "build"]).status().map_err(|e| format!("cargo fuzz build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo fuzz build failed ({status})"));
    }
    println!("fuzz       built in {:.0}s", started.elapsed().as_secs_f32());
    let logs = root().join("target").join("fuzz-logs");
    fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let mut outcomes = Vec::new();
    for target in &targets {
        let corpus = dir.join("corpus").join(target);
        fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        let log_path = logs.join(format!("{target}.log"));
        let log = fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let seeds = format!("fuzz/seeds/{target}");
        let corpus_arg = format!("fuzz/corpus/{target}");
        let budget = format!("-max_total_time={seconds}");
        let status = nightly_command(&[
            "fuzz",
            "run",
            target,
            &corpus_arg,
            &seeds,
            "--",
            &budget,
            "-print_final_stats=1",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .map_err(|e| format!("cargo fuzz run {target}: {e}"))?;
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        if !status.success() {
            let artifact =
                text.lines().find(|l| l.contains("Test unit written to")).unwrap_or("(no artifact line)");
            return Err(format!(
                "fuzz target `{target}` failed ({status}); log: {}\n{artifact}\nAdd the input to fuzz/seeds/{target}/ \
                 once fixed: the seeds run in `cargo xtask ci`.",
                log_path.display()
            ));
        }
        let outcome = parse_outcome(target, &text, &corpus);
        println!(
            "fuzz       {:<20} {:>10} runs in {:>4}s, coverage {:>5}, corpus {:>5}: no failure",
            outcome.target, outcome.runs, outcome.seconds, outcome.coverage, outcome.corpus
        );
        outcomes.push(outcome);
    }
    let runs: u64 = outcomes.iter().map(|o| o.runs).sum();
    println!(
        "fuzz passed: {} targets, {runs} runs, {:.0}s in all (logs in target/fuzz-logs)",
        outcomes.len(),
        started.elapsed().as_secs_f32()
    );
    Ok(())
}

/// `rustup run nightly cargo ARGS` from the root, so the pinned stable toolchain is bypassed.
fn nightly_command(args: &[&str]) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", "nightly", "cargo"]).args(args).current_dir(root());
    // Set by the rustup proxy that started us; it would override `rustup run`'s choice.
    command.env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO");
    command
}

fn nightly(args: &[&str]) -> Result<(), String> {
    let out = nightly_command(args).output().map_err(|e| format!("rustup: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`cargo +nightly {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// libFuzzer's last lines: `Done 123 runs in 60 second(s)` and `#123 DONE cov: 456 ...`.
fn parse_outcome(target: &str, log: &str, corpus: &Path) -> Outcome {
    let field = |line: &str, key: &str| -> Option<u64> {
        let rest = line.split(key).nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    };
    let done = log.lines().rev().find(|l| l.starts_with("Done "));
    let runs = done.and_then(|l| field(l, "Done ")).unwrap_or(0);
    let seconds = done.and_then(|l| field(l, " in ")).unwrap_or(0);
    let coverage =
        log.lines().rev().find(|l| l.contains("DONE ")).and_then(|l| field(l, "cov: ")).unwrap_or(0);
    let corpus = fs::read_dir(corpus).map_or(0, Iterator::count);
    Outcome { target: target.to_owned(), runs, seconds, coverage, corpus }
}
