//! Progress display on stderr (indicatif); absent with --json or when stderr is not a terminal.

use std::io::IsTerminal as _;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar that may not exist; every method is a no-op then.
pub(crate) struct Progress {
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub(crate) fn new(json: bool) -> Self {
        Progress { enabled: !json && std::io::stderr().is_terminal(), bar: None }
    }

    /// Replaces the current bar with a new phase of `len` steps.
    pub(crate) fn phase(&mut self, name: &str, len: u64) {
        self.finish();
        if !self.enabled {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(name.to_owned());
        self.bar = Some(bar);
    }

    pub(crate) fn set(&self, pos: u64, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            bar.set_message(msg);
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
