//! Progress lines for long jobs (`synth`, `preprocess`), shared by worker threads.
//!
//! On a terminal the line is redrawn in place at most 5 times a second; in a log file (systemd, CI)
//! one line is written every 10 seconds and at the end, so logs stay readable.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: usize,
    done: AtomicUsize,
    failed: AtomicUsize,
    start: Instant,
    last: Mutex<Option<Instant>>,
    tty: bool,
}

impl Progress {
    pub fn new(label: &str, total: usize) -> Self {
        Self {
            label: label.to_string(),
            total,
            done: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            start: Instant::now(),
            last: Mutex::new(None),
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Counts one finished item (`ok = false` for a failed one) and redraws when due.
    pub fn tick(&self, ok: bool) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.draw(false);
    }

    /// Sets the count (for callers that report "done of total" themselves) and redraws when due.
    pub fn set(&self, done: usize) {
        self.done.fetch_max(done, Ordering::Relaxed);
        self.draw(false);
    }

    /// Items counted so far.
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Writes the final line.
    pub fn finish(&self) {
        self.draw(true);
        if self.tty {
            eprintln!();
        }
    }

    fn draw(&self, force: bool) {
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(10) };
        {
            let Ok(mut last) = self.last.lock() else { return };
            let now = Instant::now();
            if !force && last.is_some_and(|t| now - t < every) {
                return;
            }
            *last = Some(now);
        }
        let done = self.done();
        let failed = self.failed.load(Ordering::Relaxed);
        let secs = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 && done < self.total {
            format!(", about {} left", human_secs(secs / done as f64 * (self.total - done) as f64))
        } else {
            String::new()
        };
        let failed = if failed > 0 { format!(", {failed} failed") } else { String::new() };
        let line = format!("{}: {done}/{} patients{failed}, {}{eta}", self.label, self.total, human_secs(secs));
        let mut err = std::io::stderr().lock();
        let _ = if self.tty { write!(err, "\r\x1b[2K{line}") } else { writeln!(err, "{line}") };
        let _ = err.flush();
    }
}

fn human_secs(s: f64) -> String {
    if s < 90.0 { format!("{s:.0} s") } else { format!("{:.1} min", s / 60.0) }
}
