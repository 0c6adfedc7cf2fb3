//! The apiservers a client may use, in order, and which one it uses now.
//! Several apiservers share one PostgreSQL database; a client given all of
//! them (`https://a:7443,https://b:7443`) moves to the next when one stops
//! answering, and a watch it resumes there from its last resourceVersion
//! misses nothing, as every apiserver serves the same change log.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A client's apiservers.
#[derive(Debug)]
pub struct Servers {
    bases: Vec<String>,
    current: AtomicUsize,
}

impl Servers {
    /// The servers of `list`: one base URL, or several separated by commas
    /// (spaces and trailing slashes ignored).
    pub fn parse(list: &str) -> Servers {
        let mut bases: Vec<String> =
            list.split(',').map(|b| b.trim().trim_end_matches('/').to_string()).filter(|b| !b.is_empty()).collect();
        if bases.is_empty() {
            bases.push(String::new());
        }
        Servers { bases, current: AtomicUsize::new(0) }
    }

    /// The base URL requests go to now.
    pub fn current(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Every base, comma-separated, as [`Servers::parse`] reads them.
    pub fn list(&self) -> String {
        self.bases.join(",")
    }

    /// How many servers there are.
    pub fn len(&self) -> usize {
        self.bases.len()
    }

    /// Whether there is only an empty base (never: `parse` keeps one).
    pub fn is_empty(&self) -> bool {
        self.bases.is_empty()
    }

    /// Records that the server `url` was sent to did not answer: the next
    /// request goes to the one after it. Several requests failing on the
    /// same server move on once, not once each.
    pub fn failed(&self, url: &reqwest::Url) {
        let Some(i) = self.bases.iter().position(|b| url.as_str().starts_with(b.as_str())) else { return };
        let next = (i + 1) % self.bases.len();
        let _ = self.current.compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
        if next != i {
            tracing::warn!(from = %self.bases[i], to = %self.bases[next], "apiserver not answering; trying the next");
        }
    }

    /// `request` aimed at the current server (its path and query kept).
    pub fn retarget(&self, mut request: reqwest::Request) -> reqwest::Request {
        let url = request.url();
        let mut rest = url.path().to_string();
        if let Some(q) = url.query() {
            rest.push('?');
            rest.push_str(q);
        }
        if let Ok(moved) = reqwest::Url::parse(&format!("{}{rest}", self.current())) {
            *request.url_mut() = moved;
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_read_in_order_and_a_failure_moves_on_once() {
        let s = Servers::parse(" https://a:7443/ , https://b:7443");
        assert_eq!(s.list(), "https://a:7443,https://b:7443");
        assert_eq!(s.current(), "https://a:7443");
        let on_a = reqwest::Url::parse("https://a:7443/v1/projects/p/vms?watch=true").unwrap();
        s.failed(&on_a);
        s.failed(&on_a);
        assert_eq!(s.current(), "https://b:7443", "two failures on a move on once");
        let request = reqwest::Request::new(reqwest::Method::GET, on_a);
        assert_eq!(s.retarget(request).url().as_str(), "https://b:7443/v1/projects/p/vms?watch=true");
        s.failed(&reqwest::Url::parse("https://b:7443/version").unwrap());
        assert_eq!(s.current(), "https://a:7443", "and round again");
    }

    #[test]
    fn one_server_stays_itself() {
        let s = Servers::parse("https://only:7443");
        s.failed(&reqwest::Url::parse("https://only:7443/x").unwrap());
        assert_eq!(s.current(), "https://only:7443");
        assert_eq!(s.len(), 1);
    }
}
