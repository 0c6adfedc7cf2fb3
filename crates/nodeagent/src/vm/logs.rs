//! A VM's Firecracker log, guest console and metrics, read from its run
//! directory. Callers name a log by kind, never by path.

use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

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

/// Follows a VM's log as plain text, one line per line: the last `n`
/// lines (those written at or after `since`, when given), then each new
/// line as it is written. When a new VMM takes over (the pid file changes)
/// a line of its own says so and the output goes on; the stream ends, with
/// a last line saying why, when the VM's directory goes (it was deleted).
pub fn follow(
    paths: VmPaths,
    file: LogFile,
    n: usize,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> impl Stream<Item = Result<bytes::Bytes, Infallible>> + Send {
    struct State {
        paths: VmPaths,
        path: PathBuf,
        offset: Option<u64>,
        pending: std::collections::VecDeque<String>,
        partial: String,
        initial: usize,
        since: Option<chrono::DateTime<chrono::Utc>>,
        pid: Option<String>,
        ended: bool,
    }
    let path = file.path(&paths);
    let pid = std::fs::read_to_string(paths.pid()).ok();
    let state = State {
        paths,
        path,
        offset: None,
        pending: Default::default(),
        partial: String::new(),
        initial: n,
        since,
        pid,
        ended: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(line) = st.pending.pop_front() {
                return Some((Ok(bytes::Bytes::from(line + "\n")), st));
            }
            if st.ended {
                return None;
            }
            match st.offset {
                None => {
                    let (lines, end) = match tail(&st.path, if st.since.is_some() { MAX_TAIL } else { st.initial }) {
                        Ok(t) => t,
                        Err(_) => return None,
                    };
                    let lines: Vec<String> = match st.since {
                        Some(t) => lines.into_iter().filter(|l| stamped_at_or_after(l, t)).collect(),
                        None => lines,
                    };
                    let skip = lines.len().saturating_sub(st.initial);
                    st.pending.extend(lines.into_iter().skip(skip));
                    st.offset = Some(end);
                }
                Some(off) => {
                    tokio::time::sleep(FOLLOW_POLL).await;
                    if !st.paths.dir.exists() {
                        st.pending.push_back("[nexus] the VM was deleted; end of its log".into());
                        st.ended = true;
                        continue;
                    }
                    let pid = std::fs::read_to_string(st.paths.pid()).ok();
                    if pid.is_some() && pid != st.pid {
                        let shown = pid.as_deref().unwrap_or_default().trim().to_string();
                        st.pending
                            .push_back(format!("[nexus] the VMM was started again (pid {shown}); its output follows"));
                        st.pid = pid;
                    }
                    let Ok(mut f) = std::fs::File::open(&st.path) else { continue };
                    let len = f.metadata().map(|m| m.len()).unwrap_or(off);
                    if len < off {
                        // Truncated: start again from the top.
                        st.offset = Some(0);
                        continue;
                    }
                    if len == off {
                        continue;
                    }
                    if f.seek(SeekFrom::Start(off)).is_err() {
                        continue;
                    }
                    let mut buf = Vec::new();
                    if (&mut f).take(len - off).read_to_end(&mut buf).is_err() {
                        continue;
                    }
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

/// How often a followed log is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// Whether `line` starts with a timestamp (Firecracker's format,
/// `2026-12-01T08:20:13.029494919 [...]`) at or after `t`.
pub fn stamped_at_or_after(line: &str, t: chrono::DateTime<chrono::Utc>) -> bool {
    line.split_whitespace()
        .next()
        .and_then(|s| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").ok())
        .is_some_and(|at| at.and_utc() >= t)
}

/// The last `n` lines of `path` written at or after `since`.
pub fn tail_since(
    path: &std::path::Path,
    n: usize,
    since: chrono::DateTime<chrono::Utc>,
) -> std::io::Result<Vec<String>> {
    let (lines, _) = tail(path, MAX_TAIL)?;
    let kept: Vec<String> = lines.into_iter().filter(|l| stamped_at_or_after(l, since)).collect();
    let skip = kept.len().saturating_sub(n);
    Ok(kept.into_iter().skip(skip).collect())
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
    fn only_lines_stamped_since_the_time_pass() {
        let t: chrono::DateTime<chrono::Utc> = "2026-12-01T08:20:13Z".parse().unwrap();
        assert!(stamped_at_or_after("2026-12-01T08:20:13.029494919 [x:main] up", t));
        assert!(!stamped_at_or_after("2026-12-01T08:20:12.999999999 [x:main] before", t));
        assert!(!stamped_at_or_after("guest console line", t));
    }

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
