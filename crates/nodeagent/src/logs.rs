//! A VM's Firecracker log, guest console and metrics, read from its run
//! directory. Callers name a log by kind, never by path.

use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;

use crate::paths::VmPaths;

/// Most lines one tail returns.
pub const MAX_TAIL: usize = 10_000;
/// How much of the end of a file a tail reads.
const TAIL_WINDOW: u64 = 4 << 20;

/// Which log to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFile {
    /// Firecracker's own log (`PUT /logger`).
    #[default]
    Firecracker,
    /// The guest's serial console (the VMM's stdout).
    Console,
}

impl LogFile {
    pub fn path(self, paths: &VmPaths) -> PathBuf {
        match self {
            LogFile::Firecracker => paths.log(),
            LogFile::Console => paths.console(),
        }
    }
}

/// The last `n` lines of `path` and the offset its end was at.
pub fn tail(path: &std::path::Path, n: usize) -> std::io::Result<(Vec<String>, u64)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(TAIL_WINDOW);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if start > 0 && !lines.is_empty() {
        // The first line was cut by the window.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok((lines.split_off(skip), len))
}

/// Server-sent events: the last `n` lines, then each new line as it is
/// written, until the client goes away or the file does.
pub fn follow(path: PathBuf, n: usize) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = async_stream(path, n);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn async_stream(path: PathBuf, n: usize) -> impl Stream<Item = Result<Event, Infallible>> {
    struct State {
        path: PathBuf,
        offset: Option<u64>,
        pending: std::collections::VecDeque<String>,
        partial: String,
        initial: usize,
    }
    let state = State { path, offset: None, pending: Default::default(), partial: String::new(), initial: n };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(line) = st.pending.pop_front() {
                return Some((Ok(Event::default().data(line)), st));
            }
            match st.offset {
                None => {
                    let (lines, end) = tail(&st.path, st.initial).ok()?;
                    st.pending.extend(lines);
                    st.offset = Some(end);
                }
                Some(off) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let mut f = std::fs::File::open(&st.path).ok()?;
                    let len = f.metadata().ok()?.len();
                    if len < off {
                        // Truncated: start again from the top.
                        st.offset = Some(0);
                        continue;
                    }
                    if len == off {
                        continue;
                    }
                    f.seek(SeekFrom::Start(off)).ok()?;
                    let mut buf = Vec::new();
                    (&mut f).take(len - off).read_to_end(&mut buf).ok()?;
                    st.offset = Some(len);
                    st.partial.push_str(&String::from_utf8_lossy(&buf));
                    while let Some(pos) = st.partial.find('\n') {
                        let line: String = st.partial.drain(..=pos).collect();
                        st.pending.push_back(line.trim_end_matches('\n').to_string());
                    }
                }
            }
        }
    })
}

/// The newest metrics object Firecracker wrote, if any.
pub fn latest_metrics(paths: &VmPaths) -> std::io::Result<Option<serde_json::Value>> {
    let (lines, _) = tail(&paths.metrics(), 1)?;
    Ok(lines.last().and_then(|l| serde_json::from_str(l).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, (1..=50).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        let (lines, end) = tail(&p, 3).unwrap();
        assert_eq!(lines, vec!["line 48", "line 49", "line 50"]);
        assert_eq!(end, std::fs::metadata(&p).unwrap().len());
        assert_eq!(tail(&p, 1000).unwrap().0.len(), 50);
    }
}
