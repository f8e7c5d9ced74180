//! The command line's progress display: one indicatif bar per training stage, fed by the training driver.

use indicatif::{ProgressBar, ProgressStyle};
use kiln_model::train::driver::Progress;

/// A bar labelled with the stage's name.
pub struct Bar {
    bar: ProgressBar,
    /// Remove the bar when the stage ends (the study prints its own summary lines).
    clear: bool,
}

impl Bar {
    pub fn new(label: &str) -> Bar {
        let bar = ProgressBar::new(0);
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
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("valid template"));
    bar.set_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
