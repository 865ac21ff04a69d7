//! `dunite check`: the offline check of a stopped server's data directory, with progress.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use dunite_core::{CheckProgress, Repair, Verify};

use super::args::CheckArgs;
use super::progress::Progress;
use crate::check::{CheckRun, ProgressPerCache, check_data_dir};

/// Run `dunite check`: exit status 0 if the directory is consistent (or was repaired), 1 if
/// not, 2 if it could not be checked.
pub async fn check(args: CheckArgs) -> ExitCode {
    let verify = match (args.all, args.sample) {
        (true, _) => Verify::All,
        (false, Some(n)) => Verify::Sample(n),
        (false, None) => Verify::None,
    };
    let progress: Arc<ProgressPerCache> = Arc::new(|name: &str| {
        let display = Arc::new(Progress::new(&format!("hashing {name}")));
        Arc::new(move |done: u64, total: u64| {
            display.set(done, total);
            if done >= total {
                display.finish();
            }
        }) as Arc<CheckProgress>
    });
    let run = CheckRun {
        verify,
        repair: if args.repair { Repair::Yes } else { Repair::No },
        progress: Some(progress),
    };
    let reports = match check_data_dir(&args.data_dir, args.database_url.as_deref(), &run).await {
        Ok(reports) => reports,
        Err(error) => {
            tracing::error!(error = %crate::error_chain(&error), "cannot check");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    let mut consistent = true;
    for (name, report) in &reports {
        let _ = writeln!(
            out,
            "{name}: {} entries, {} bytes, {} files, {} payloads verified",
            report.rows, report.row_bytes, report.files, report.verified
        );
        for finding in &report.findings {
            let done = if finding.repaired { "repaired" } else { "found" };
            let _ = writeln!(out, "  {done}: {}", finding.problem);
        }
        consistent &= report.is_consistent();
    }
    let problems: usize = reports.iter().map(|(_, r)| r.findings.len()).sum();
    let verdict = match (problems, consistent) {
        (0, _) => "consistent".to_owned(),
        (n, true) => format!("{n} problems, all repaired"),
        (n, false) => format!("{n} problems (run with --repair to fix them)"),
    };
    let _ = writeln!(out, "{verdict}");
    if consistent { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
