//! The command line's progress display: one indicatif bar per training stage, fed by the training driver, all
//! drawn by one `MultiProgress` so a long job (the study) can keep an overall bar below its runs' bars.

use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kiln_model::train::driver::Progress;

/// Every bar of the process, drawn together.
fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(MultiProgress::new)
}

/// Print a line above the bars without tearing them.
pub fn say(line: &str) {
    multi().suspend(|| println!("{line}"));
}

/// A bar over a whole job's `total` parts (the study's runs), kept until the job ends.
pub fn overall(label: &str, total: u64) -> ProgressBar {
    let bar = multi().add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label:<10} {{bar:30}} {{pos}}/{{len}} runs [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        ))
        .expect("valid template"),
    );
    bar
}

/// A bar labelled with the stage's name.
pub struct Bar {
    bar: ProgressBar,
    /// Remove the bar when the stage ends (the study prints its own summary lines).
    clear: bool,
}

impl Bar {
    pub fn new(label: &str) -> Bar {
        let bar = multi().add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{label:<10} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
            ))
            .expect("valid template"),
        );
        Bar { bar, clear: false }
    }

    /// A bar that disappears when its stage finishes.
    pub fn transient(label: &str) -> Bar {
        Bar { clear: true, ..Bar::new(label) }
    }
}

impl Progress for Bar {
    fn start(&mut self, at: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(at);
    }

    fn update(&mut self, step: u64, message: &str) {
        self.bar.set_position(step);
        self.bar.set_message(message.to_string());
    }

    fn finish(&mut self) {
        if self.clear {
            self.bar.finish_and_clear();
        } else {
            self.bar.finish();
        }
    }
}

/// A spinner for work without steps (building an evaluation suite, scoring a checkpoint).
pub fn spinner(msg: String) -> ProgressBar {
    let bar = multi().add(ProgressBar::new_spinner());
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("valid template"));
    bar.set_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
