//! A small W3C WebDriver client for the dashboard's browser tests: Debian's
//! `chromium`, headless, driven through its `chromedriver`. Sync like every
//! other test helper here, over the `ureq` the tests already use (an async
//! client such as fantoccini would bring a runtime and a second HTTP stack
//! for the dozen calls a test makes). A browser that goes away while a test
//! is failing leaves a screenshot and the page's HTML in
//! `target/test-artifacts/`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::{free_port, wait_until, Proc, World};

/// The key W3C WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    _driver: Proc,
    session: String,
    base: String,
    http: ureq::Agent,
    name: String,
}

/// An element of the page, as the driver refers to it.
#[derive(Clone)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless chromium window of `width`×`height`.
    /// `name` names its artifacts.
    pub fn start(world: &World, name: &str, width: u32, height: u32) -> Browser {
        let driver_bin = crate::which("chromedriver").expect("chromedriver (apt-get install chromium-driver)");
        let port = free_port();
        let driver =
            Proc::spawn(&format!("chromedriver-{name}"), &driver_bin, &[format!("--port={port}")], world.path());
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        wait_until(Duration::from_secs(20), || {
            let mut r = http.get(format!("{base}/status")).call().ok()?;
            let v: Value = r.body_mut().read_json().ok()?;
            (v["value"]["ready"] == true).then_some(())
        })
        .expect("chromedriver ready");
        let profile = world.path().join(format!("chromium-{name}"));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": crate::which("chromium").expect("chromium").display().to_string(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--no-first-run", "--disable-extensions",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let mut r = http.post(format!("{base}/session")).send_json(&caps).expect("new session");
        let v: Value = r.body_mut().read_json().expect("session JSON");
        let session = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        Browser { _driver: driver, session, base, http, name: name.to_string() }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut r = match (method, body) {
            ("GET", _) => self.http.get(&url).call(),
            ("DELETE", _) => self.http.delete(&url).call(),
            (_, b) => self.http.post(&url).send_json(b.unwrap_or_else(|| json!({}))),
        }
        .with_context(|| format!("{method} {path}"))?;
        let v: Value = r.body_mut().read_json().with_context(|| format!("{method} {path}: not JSON"))?;
        if let Some(e) = v["value"]["error"].as_str() {
            bail!("{e}: {}", v["value"]["message"].as_str().unwrap_or(""));
        }
        Ok(v["value"].clone())
    }

    /// Opens a new tab and makes it the current one.
    pub fn new_tab(&self) {
        let v = self.call("POST", "/window/new", Some(json!({ "type": "tab" }))).expect("new tab");
        let handle = v["handle"].as_str().expect("handle").to_string();
        self.call("POST", "/window", Some(json!({ "handle": handle }))).expect("switch tab");
    }

    /// Sets the window's outer size (a phone: 390×844).
    pub fn set_window_size(&self, width: u32, height: u32) {
        self.call("POST", "/window/rect", Some(json!({ "width": width, "height": height }))).expect("window size");
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url }))).expect("navigate");
    }

    /// The first element `css` selects now, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        let v = self.call("POST", "/element", Some(json!({"using": "css selector", "value": css}))).ok()?;
        v[ELEMENT].as_str().map(|id| Element(id.to_string()))
    }

    pub fn find_all(&self, css: &str) -> Vec<Element> {
        let v =
            self.call("POST", "/elements", Some(json!({"using": "css selector", "value": css}))).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str())
            .map(|id| Element(id.to_string()))
            .collect()
    }

    /// Waits for an element `css` selects.
    pub fn wait(&self, css: &str, timeout: Duration) -> Element {
        wait_until(timeout, || self.find(css))
            .unwrap_or_else(|| panic!("no element {css:?} within {timeout:?}; page: {}", self.body_text()))
    }

    /// The rendered text of an element (empty when it went away meanwhile).
    pub fn text_of(&self, e: &Element) -> String {
        self.call("GET", &format!("/element/{}/text", e.0), None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// The text of what `css` selects, once `ok` holds of it.
    pub fn wait_text(&self, css: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        wait_until(timeout, || {
            last = self.text_of(&self.find(css)?);
            ok(&last).then(|| last.clone())
        })
        .unwrap_or_else(|| panic!("{css:?} never read as expected within {timeout:?}; last: {last:?}"))
    }

    pub fn body_text(&self) -> String {
        self.find("body").map(|b| self.text_of(&b)).unwrap_or_default()
    }

    /// Clicks what `css` selects, once it is there.
    pub fn click_on(&self, css: &str, timeout: Duration) {
        // An element re-rendered between finding and clicking is found again.
        wait_until(timeout, || {
            let e = self.find(css)?;
            self.call("POST", &format!("/element/{}/click", e.0), None).ok()
        })
        .unwrap_or_else(|| panic!("could not click {css:?} within {timeout:?}"));
    }

    /// Empties what `css` selects and types `text` into it, once it is
    /// there; found and typed again if the page re-rendered it meanwhile,
    /// until the field holds `text`.
    pub fn fill(&self, css: &str, text: &str, timeout: Duration) {
        wait_until(timeout, || {
            let e = self.find(css)?;
            self.call("POST", &format!("/element/{}/clear", e.0), None).ok()?;
            self.call("POST", &format!("/element/{}/value", e.0), Some(json!({ "text": text }))).ok()?;
            let now = self.call("GET", &format!("/element/{}/property/value", e.0), None).ok()?;
            (now.as_str() == Some(text)).then_some(())
        })
        .unwrap_or_else(|| panic!("could not type into {css:?} within {timeout:?}"));
    }

    pub fn attribute(&self, e: &Element, name: &str) -> Option<String> {
        self.call("GET", &format!("/element/{}/attribute/{name}", e.0), None).ok()?.as_str().map(str::to_string)
    }

    /// Runs `script` (a function body) in the page; its `return` value.
    pub fn script(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", Some(json!({"script": script, "args": []}))).expect("script")
    }

    /// Runs `script` with `args` (a function body whose last argument is a
    /// callback); the value it calls back with.
    pub fn script_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.call("POST", "/execute/async", Some(json!({"script": script, "args": args}))).expect("async script")
    }

    /// Loads `url` afresh (through a blank page, so a change of `#…` alone
    /// is a whole new load too) and returns the page's clock, in ms since it
    /// started loading, when an element `css` selects first holds `text`.
    pub fn load_until(&self, url: &str, css: &str, text: &str) -> f64 {
        self.goto("about:blank");
        self.goto(url);
        let v = self.script_async(
            "const [sel, want, done] = arguments;
             const ok = () => { const e = document.querySelector(sel); return e && e.textContent.includes(want); };
             if (ok()) return done(performance.now());
             const mo = new MutationObserver(() => { if (ok()) { mo.disconnect(); done(performance.now()); } });
             mo.observe(document.body, { subtree: true, childList: true, characterData: true });",
            vec![json!(css), json!(text)],
        );
        v.as_f64().unwrap_or_else(|| panic!("{css:?} with {text:?} never showed on {url}: {v}"))
    }

    /// With `BATON_SCREENSHOTS=1`, a screenshot of the page as it is now
    /// (to look at the pages a passing test went through).
    pub fn checkpoint(&self, what: &str) {
        if std::env::var_os("BATON_SCREENSHOTS").is_some() {
            if let Err(e) = self.screenshot(what) {
                eprintln!("screenshot {what}: {e}");
            }
        }
    }

    /// Saves a PNG of the window (and the page's HTML beside it) under
    /// `target/test-artifacts/`; returns the PNG's path.
    pub fn screenshot(&self, what: &str) -> anyhow::Result<PathBuf> {
        let dir = artifacts();
        std::fs::create_dir_all(&dir)?;
        let shot = self.call("GET", "/screenshot", None)?;
        let png = base64_decode(shot.as_str().ok_or_else(|| anyhow!("no screenshot"))?)?;
        let path = dir.join(format!("{}-{what}.png", self.name));
        std::fs::write(&path, png)?;
        if let Ok(html) = self.call("GET", "/source", None) {
            std::fs::write(dir.join(format!("{}-{what}.html", self.name)), html.as_str().unwrap_or_default())?;
        }
        Ok(path)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            match self.screenshot("failure") {
                Ok(p) => eprintln!("browser screenshot at failure: {}", p.display()),
                Err(e) => eprintln!("no screenshot at failure: {e}"),
            }
        }
        let _ = self.call("DELETE", "", None);
    }
}

/// `target/test-artifacts`, beside the binaries under test.
pub fn artifacts() -> PathBuf {
    let bin = crate::bin("baton");
    bin.parent().and_then(|p| p.parent()).map_or_else(|| PathBuf::from("test-artifacts"), |t| t.join("test-artifacts"))
}

/// Standard base64 (what WebDriver screenshots are in).
fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {:?}", c as char),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::base64_decode("aGVsbG8gd29ybGQ=").expect("valid"), b"hello world");
        assert_eq!(super::base64_decode("iVBORw0KGgo=").expect("valid"), b"\x89PNG\r\n\x1a\n");
        assert!(super::base64_decode("a*b").is_err());
    }
}
