//! dunite's benchmark scenarios: `cargo xtask bench [--quick] [--json PATH] [--only NAME]`.
//!
//! Every scenario runs against real SQLite databases and real files in a temporary
//! directory, next to a baseline measured in the same run, and prints a Markdown table (the
//! one in `docs/benchmarks.md`). `--json PATH` also writes one JSON object per scenario, one
//! per line. `--quick` uses smaller sizes and counts: a smoke test, not figures to quote.
//!
//! A hidden subcommand, `__store-large-blob DIR BYTES`, stores one generated blob and
//! reports its own peak RSS; the large-blob scenario re-executes this binary with it so the
//! peak measured is that of the store alone.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line benchmark: printing is its output"
)]
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    reason = "benchmark figures are reported as floats; the counts involved are far below 2^52"
)]

mod payload;
mod report;
mod scenarios;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use report::Record;

/// The error type of the benchmark: any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A benchmark result.
pub type Result<T, E = BoxError> = std::result::Result<T, E>;

const USAGE: &str = "usage: dunite-bench [--quick] [--json PATH] [--only NAME]...

  --quick       smaller sizes and counts (a smoke test, under 2 minutes on 2 cores)
  --json PATH   also write one JSON object per scenario (JSON lines) to PATH
  --only NAME   run only the scenarios whose name starts with NAME (repeatable):
                burst, large-blob, small-blob, eviction, hits, http, scale
  --dir PATH    where to create the temporary directories (default: the system temp dir)
  --latency-ms N  simulated latency per database statement in the burst scenario (default 1;
                above 1 the acquire timeout is 10 s, so that stores wait rather than fail)";

#[derive(Debug, Default)]
struct Args {
    quick: bool,
    json: Option<PathBuf>,
    only: Vec<String>,
    dir: Option<PathBuf>,
    latency_ms: Option<u64>,
}

fn parse_args(args: &[String]) -> Result<Args> {
    let mut parsed = Args::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => parsed.quick = true,
            "--json" => parsed.json = Some(it.next().ok_or("--json needs a path")?.into()),
            "--only" => parsed.only.push(it.next().ok_or("--only needs a scenario name")?.clone()),
            "--dir" => parsed.dir = Some(it.next().ok_or("--dir needs a path")?.into()),
            "--latency-ms" => {
                let n = it.next().ok_or("--latency-ms needs a number")?;
                parsed.latency_ms =
                    Some(n.parse().map_err(|_| format!("--latency-ms takes milliseconds, got `{n}`"))?);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument `{other}`\n\n{USAGE}").into()),
        }
    }
    Ok(parsed)
}

/// How the scenarios are run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Smaller sizes and counts.
    pub quick: bool,
    /// Parent of every temporary directory.
    pub dir: PathBuf,
    /// Simulated latency per database statement in the burst scenario (`--latency-ms`).
    pub latency: std::time::Duration,
}

impl Settings {
    /// A fresh temporary directory for one scenario run.
    ///
    /// # Errors
    ///
    /// If the directory cannot be created.
    pub fn tempdir(&self) -> Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new().prefix("dunite-bench-").tempdir_in(&self.dir)?)
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some(scenarios::large::CHILD_COMMAND) {
        scenarios::large::child_main(&args[1..])
    } else {
        parse_args(&args).and_then(run)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dunite-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let settings = Settings {
        quick: args.quick,
        dir: args.dir.unwrap_or_else(std::env::temp_dir),
        latency: std::time::Duration::from_millis(args.latency_ms.unwrap_or(1)),
    };
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| name.starts_with(o.as_str()));
    let runtime = runtime()?;
    let started = Instant::now();
    let mut json = match &args.json {
        Some(path) => Some(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => None,
    };
    println!(
        "# dunite-bench ({} run, {} worker threads)\n",
        if settings.quick { "quick" } else { "full" },
        2
    );
    let mut missed = 0;
    for scenario in scenarios::ALL {
        if !wanted(scenario.name) {
            continue;
        }
        eprintln!("dunite-bench: running {} ...", scenario.name);
        let scenario_started = Instant::now();
        let records: Vec<Record> = runtime.block_on((scenario.run)(settings.clone()))?;
        eprintln!("dunite-bench: {} took {:.1}s", scenario.name, scenario_started.elapsed().as_secs_f64());
        for record in records {
            println!("{}", record.to_table());
            missed += record.targets.iter().filter(|t| !t.met).count();
            if let Some(out) = json.as_mut() {
                serde_json::to_writer(&mut *out, &record.to_json())?;
                out.write_all(b"\n")?;
            }
        }
    }
    if let Some(mut out) = json {
        out.flush()?;
    }
    println!(
        "Total: {:.1}s; {missed} target(s) missed (see docs/benchmarks.md).",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
