//! Progress of a long command: a bar on a terminal (`indicatif`), plain lines otherwise (CI
//! logs, pipes), where a bar's redraws would be noise.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;

/// A progress display of bytes done out of a total.
#[derive(Debug)]
pub(crate) enum Progress {
    /// A terminal: a bar redrawn in place on standard error.
    Bar(indicatif::ProgressBar),
    /// Not a terminal: a line on standard error each tenth of the way.
    Lines {
        label: String,
        /// The last tenth reported.
        reported: Mutex<Option<u64>>,
    },
}

impl Progress {
    /// A display for `label`, a bar if standard error is a terminal.
    pub(crate) fn new(label: &str) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.to_owned());
            Self::Bar(bar)
        } else {
            Self::Lines { label: label.to_owned(), reported: Mutex::new(None) }
        }
    }

    /// `done` of `total` bytes.
    pub(crate) fn set(&self, done: u64, total: u64) {
        match self {
            Self::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Self::Lines { label, reported } => {
                let tenth = done.saturating_mul(10).checked_div(total).unwrap_or(10);
                let mut last = reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if last.is_none_or(|last| tenth > last) {
                    *last = Some(tenth);
                    let _ = writeln!(std::io::stderr(), "{label}: {done} of {total} bytes");
                }
            }
        }
    }

    /// Done: clear the bar (the caller prints the outcome).
    pub(crate) fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
