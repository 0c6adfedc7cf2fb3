//! A small W3C WebDriver client over the HTTP client the tests already
//! use, and a headless Chromium driven through Debian's `chromedriver`:
//! enough to sign in, click, type, read text, run a script and take a
//! screenshot.
//!
//! Why not `fantoccini`: without its TLS features it needs no second TLS
//! stack, but its `webdriver` dependency (0.53) brings 22 crates for the
//! ten calls used here, among them second major versions of `http` (0.2
//! beside 1), `cookie` (0.16 beside 0.18), `thiserror` (1 beside 2) and
//! ICU (1.5 beside 2.1), which the workspace otherwise avoids.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

/// The key W3C WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A `chromedriver` process, stopped on drop.
#[derive(Debug)]
pub struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `chromium` and `chromedriver`, if installed.
pub fn chromium() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| names.iter().map(PathBuf::from).find(|p| p.is_file());
    Some((
        find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"])?,
        find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])?,
    ))
}

impl Driver {
    /// Starts `chromedriver` on a free port and waits until it answers.
    pub async fn start(chromedriver: &Path, log: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port for chromedriver")
            .port();
        let out = std::fs::File::create(log).expect("chromedriver log");
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("starting chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{url}/status")).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not answer within 20 s (see {})", log.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver { child, url }
    }

    /// A new headless browser session of `width` x `height` pixels that
    /// trusts any certificate (the test cluster's CA is its own).
    pub async fn session(&self, chromium: &Path, width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let http = reqwest::Client::new();
        let v: Value = http
            .post(format!("{}/session", self.url))
            .json(&caps)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("a JSON answer from chromedriver");
        let id = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        let browser = Browser { http, base: format!("{}/session/{id}", self.url), _profile: profile };
        browser.call("POST", "/window/rect", json!({"width": width, "height": height})).await;
        browser
    }
}

/// One browser session. Dropping it kills its browser, should the test
/// end before [`Browser::quit`].
#[derive(Debug)]
pub struct Browser {
    http: reqwest::Client,
    base: String,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Every process started with this session's profile directory.
        let marker = format!("--user-data-dir={}", self._profile.path().display());
        for (pid, _) in crate::host::processes_mentioning(&marker) {
            // It may have gone by itself meanwhile.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// An element of the page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        self.try_call(method, path, body).await.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    async fn try_call(&self, method: &str, path: &str, body: Value) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let ok = resp.status().is_success();
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        if ok { Ok(v["value"].clone()) } else { Err(v["value"].to_string()) }
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({"url": url})).await;
    }

    /// Opens `url` and waits until its script marked the page loaded
    /// (`document.documentElement.dataset.app`), again when a load was cut
    /// short: Chromium aborts loads in flight when the host's network
    /// changes, as it does whenever a node agent adds a TAP device.
    pub async fn open(&self, url: &str) {
        for _ in 0..5 {
            self.goto(url).await;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if self.script("return document.documentElement.dataset.app || '';", json!([])).await == "loaded" {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("{url} did not load in 5 tries; page text: {}", self.text("body").await);
    }

    /// The first element matching the CSS selector, if any.
    pub async fn find(&self, css: &str) -> Option<Element> {
        let v = self.try_call("POST", "/element", json!({"using": "css selector", "value": css})).await.ok()?;
        v[ELEMENT].as_str().map(|id| Element(id.to_string()))
    }

    /// Every element matching the CSS selector.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let v = self.call("POST", "/elements", json!({"using": "css selector", "value": css})).await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str())
            .map(|id| Element(id.to_string()))
            .collect()
    }

    /// Waits up to `within` for an element matching `css`.
    pub async fn wait_for(&self, css: &str, within: Duration) -> Element {
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no element {css:?} within {within:?}; page text: {}",
                self.text("body").await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `within` until the text of the first `css` element
    /// contains `text`.
    pub async fn wait_text(&self, css: &str, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.text(css).await.contains(text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{css:?} did not show {text:?} within {within:?}; it shows {:?}",
                self.text(css).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the first element matching `css` (waiting up to 10 s for it).
    pub async fn click(&self, css: &str) {
        let e = self.wait_for(css, Duration::from_secs(10)).await;
        self.call("POST", &format!("/element/{}/click", e.0), json!({})).await;
    }

    /// Types `text` into the first element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.wait_for(css, Duration::from_secs(10)).await;
        self.call("POST", &format!("/element/{}/clear", e.0), json!({})).await;
        self.call("POST", &format!("/element/{}/value", e.0), json!({"text": text})).await;
    }

    /// The visible text of the first element matching `css` (empty if none).
    /// A live page may replace the element between finding it and reading
    /// it ("stale element reference"): it is then found again.
    pub async fn text(&self, css: &str) -> String {
        for _ in 0..10 {
            let Some(e) = self.find(css).await else { return String::new() };
            match self.try_call("GET", &format!("/element/{}/text", e.0), json!({})).await {
                Ok(v) => return v.as_str().unwrap_or("").to_string(),
                Err(e) if e.contains("stale element") => continue,
                Err(e) => panic!("WebDriver text of {css:?}: {e}"),
            }
        }
        panic!("{css:?} was replaced ten times in a row while its text was read");
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.call("POST", "/execute/sync", json!({"script": script, "args": args})).await
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.call("GET", "/screenshot", json!({})).await;
        let png = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or("")).expect("base64 PNG");
        std::fs::write(path, png).expect("writing the screenshot");
    }

    /// Ends the session (the browser exits).
    pub async fn quit(self) {
        let _ = self.try_call("DELETE", "", json!({})).await;
    }
}
