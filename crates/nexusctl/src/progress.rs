//! Progress of long commands, drawn on standard error: bytes for imports,
//! objects for applies and deletes, VMs for rollouts. Drawn only on a
//! terminal and never with `-o json|yaml`, so scripts and CI see exactly
//! the output they saw before; a bar is cleared when its work ends, leaving
//! the command's own lines.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar, or nothing where none is drawn.
#[derive(Debug, Clone)]
pub struct Progress(Option<ProgressBar>);

/// Whether bars are drawn: standard error is a terminal, and the output
/// is not meant for a program.
pub fn wanted(output: Option<&str>) -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && !matches!(output, Some("json" | "yaml"))
}

impl Progress {
    /// No bar.
    pub fn none() -> Progress {
        Progress(None)
    }

    fn make(on: bool, bar: impl FnOnce() -> ProgressBar, template: &str, what: &str) -> Progress {
        if !on {
            return Progress::none();
        }
        // Cleared when dropped too, so an error never leaves a bar drawn.
        let bar = bar()
            .with_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            )
            .with_finish(indicatif::ProgressFinish::AndClear);
        bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress(Some(bar))
    }

    /// `len` bytes of `what`.
    pub fn bytes(on: bool, len: u64, what: &str) -> Progress {
        let template = "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left";
        Progress::make(on, || ProgressBar::new(len), template, what)
    }

    /// `len` things (objects, VMs) of `what`.
    pub fn items(on: bool, len: u64, what: &str) -> Progress {
        let template = "{msg} [{bar:30}] {pos}/{len} ({elapsed})";
        Progress::make(on, || ProgressBar::new(len), template, what)
    }

    /// Work whose size is unknown (a spinner).
    pub fn spinner(on: bool, what: &str) -> Progress {
        Progress::make(on, ProgressBar::new_spinner, "{spinner} {msg} ({elapsed})", what)
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    pub fn set_position(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.set_position(n);
        }
    }

    pub fn set_length(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.set_length(n);
        }
    }

    pub fn set_message(&self, text: String) {
        if let Some(b) = &self.0 {
            b.set_message(text);
        }
    }

    /// Runs `f` with the bar out of the way (for output of its own).
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.0 {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    /// Prints `line` above the bar (a bar being drawn would overwrite it).
    pub fn println(&self, line: &str) {
        match &self.0 {
            Some(b) => b.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// `reader`, counting what is read on the bar.
    pub fn reader<R: tokio::io::AsyncRead + Unpin>(&self, reader: R) -> ProgressReader<R> {
        ProgressReader { inner: reader, bar: self.clone() }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// An `AsyncRead` that moves a bar by what it reads.
pub struct ProgressReader<R> {
    inner: R,
    bar: Progress,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ProgressReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.bar.inc((buf.filled().len() - before) as u64);
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_bar_for_programs_or_pipes() {
        assert!(!wanted(Some("json")) && !wanted(Some("yaml")));
        // Tests run with standard error captured, not on a terminal.
        let p = Progress::items(wanted(None), 10, "objects");
        assert!(p.0.is_none() || !std::io::IsTerminal::is_terminal(&std::io::stderr()));
        p.inc(1);
        p.finish();
    }
}
