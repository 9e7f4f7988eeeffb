//! The web shell end to end: a real daemon on loopback TCP, a real VM, and
//! a real headless Chromium driven over WebDriver (chromedriver). The share
//! link opens a terminal; typing `echo hi-$((6*7))` shows `hi-42`; a reload
//! reattaches the session and replays it; a revoked link closes the open
//! page and is refused, as is an expired one; a token opens nothing but
//! that sandbox's terminal.
//!
//! Needs the VM artifacts (as the other `api_*` tests) and Debian's
//! `chromium` and `chromium-driver`; without them the test skips (and
//! fails under `BHATTI_REQUIRE_VMS=1`).

mod api_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_support::*;
use bhatti::store::users::UserCaps;
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver in its own process group: the group (chromedriver and the
/// browsers it started) is killed on drop, also when the test fails.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn spawn(log: &std::path::Path) -> Driver {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let log = std::fs::File::create(log).expect("chromedriver log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn chromedriver");
        Driver { child, port }
    }

    /// A browser session, once chromedriver answers.
    async fn browser(&mut self, profile: &std::path::Path) -> Browser {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1000,700",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(b) => return b,
                Err(e) => {
                    if let Some(s) = self.child.try_wait().expect("try_wait") {
                        panic!("chromedriver exited ({s})");
                    }
                    assert!(Instant::now() < deadline, "no WebDriver session: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Everything xterm.js holds (scrollback and screen), line by line.
const BUFFER_JS: &str = r#"
    const t = window.bhattiTerm;
    if (!t) return null;
    const b = t.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) {
        const l = b.getLine(i);
        if (l) lines.push(l.translateToString(true));
    }
    return lines.join("\n");
"#;

async fn js_string(b: &Browser, script: &str) -> Option<String> {
    match b.execute(script, vec![]).await {
        Ok(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// Polls the page until its state (`data-state` on body: ok, warn, error)
/// is `want`; returns the status line.
async fn wait_state(b: &Browser, want: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let state = js_string(b, "return document.body.dataset.state || ''").await;
        let status = js_string(b, "return document.getElementById('status').textContent")
            .await
            .unwrap_or_default();
        if state.as_deref() == Some(want) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not reach state {want:?} (state {state:?}, status {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the terminal's text until a line (not the typed command's) is
/// exactly `want`.
async fn wait_line(b: &Browser, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = js_string(b, BUFFER_JS).await.unwrap_or_default();
        if text.lines().any(|l| l.trim_end() == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the terminal never showed {want:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `bhatti ARGS…` against the daemon's TCP address as `key`'s user, with
/// an empty HOME; (exit code, stdout, stderr).
async fn cli(port: u16, key: &str, args: &[&str]) -> (i32, String, String) {
    let home = tempfile::tempdir().expect("home");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bhatti"));
    cmd.args(args)
        .env("HOME", home.path())
        .env("BHATTI_URL", format!("http://127.0.0.1:{port}"))
        .env("BHATTI_TOKEN", key)
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run bhatti");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The WebSocket handshake of `/_shell/{id}/ws` with `protocols`; the
/// HTTP status it was refused with, or 101.
async fn ws_status(client: &Client, path: &str, protocols: &str) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Error;
    let stream = tokio::net::UnixStream::connect(&client.sock)
        .await
        .expect("connect");
    let mut req = format!("ws://localhost{path}")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        protocols.parse().expect("header value"),
    );
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((mut ws, resp)) => {
            assert_eq!(
                resp.headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok()),
                Some("bhatti-shell")
            );
            let _ = ws.close(None).await;
            101
        }
        Err(Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("ws {path}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_shell_in_a_real_browser() {
    const TEST: &str = "web_shell_in_a_real_browser";
    let Some(art) = artifacts(TEST) else {
        return;
    };
    for bin in [CHROMIUM, CHROMEDRIVER] {
        if !std::path::Path::new(bin).exists() {
            bhatti_testkit::skip(
                TEST,
                &format!("missing {bin} (apt-get install chromium chromium-driver)"),
            );
            return;
        }
    }
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let port = free_port();
    let mut cfg = env.config();
    cfg.listen_tcp = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    let key = env.user("alice", UserCaps::default());
    let daemon = Daemon::start(&env, cfg).await;
    let a = env.client(Some(&key));
    let anon = env.client(None);
    let sb = a
        .post("/sandboxes", json!({"name": "web"}))
        .await
        .expect(201);
    let id = sb["id"].as_str().expect("id").to_owned();

    // A link, made by the CLI: the daemon answers with a path (no
    // public_url), the CLI puts its endpoint in front; the token is in the
    // fragment, the path names the sandbox by id.
    let (code, stdout, stderr) = cli(port, &key, &["share", "web", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let made: Value = serde_json::from_str(&stdout).expect("share --json");
    let token = made["token"].as_str().expect("token").to_owned();
    let link = made["url"].as_str().expect("url").to_owned();
    assert_eq!(
        link,
        format!("http://127.0.0.1:{port}/_shell/{id}#token={token}")
    );
    assert!(made["expires_at"].as_str().is_some(), "{made}");
    // Only the hash is stored.
    let store = bhatti::store::Store::open(env.data_dir().join("bhatti.db")).expect("store");
    let stored: Vec<String> = store
        .with(|c| {
            let mut st = c.prepare("SELECT token_sha256 FROM shell_tokens")?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .expect("rows");
    assert_eq!(stored, vec![bhatti::auth::hash_key(&token)]);

    // At most five live links per sandbox.
    for _ in 0..4 {
        a.post("/sandboxes/web/shell-token", json!({}))
            .await
            .expect(201);
    }
    let msg = a
        .post("/sandboxes/web/shell-token", json!({}))
        .await
        .expect_err(409);
    assert!(msg.contains("5 live"), "{msg}");

    // The token opens this sandbox's terminal and nothing else.
    let bearer = format!("Bearer {token}");
    let check = |path: String| {
        let (anon, bearer) = (anon.clone(), bearer.clone());
        async move {
            anon.send(
                hyper::Method::GET,
                &path,
                &[("authorization", bearer.as_str())],
                bytes::Bytes::new(),
            )
            .await
        }
    };
    let ok = check(format!("/_shell/{id}/token")).await.expect(200);
    assert_eq!(ok["sandbox_id"], id.as_str());
    check(format!("/_shell/{id}x/token")).await.expect_err(401);
    check("/sandboxes".into()).await.expect_err(401);
    check(format!("/sandboxes/{id}/ws")).await.expect_err(401);
    let protocols = format!("bhatti-shell, {token}");
    assert_eq!(ws_status(&anon, "/_shell/other/ws", &protocols).await, 401);
    assert_eq!(
        ws_status(
            &anon,
            &format!("/_shell/{id}/ws?cmd=%5B%22id%22%5D"),
            &protocols
        )
        .await,
        400
    );
    assert_eq!(
        ws_status(&anon, &format!("/_shell/{id}/ws"), "bhatti-shell").await,
        401
    );

    // The browser: open the link, type, see the answer.
    let mut driver = Driver::spawn(&env.dir.path().join("chromedriver.log"));
    let profile = tempfile::tempdir().expect("profile dir");
    let b = driver.browser(profile.path()).await;
    let result = async {
        b.goto(&link).await.expect("open the link");
        wait_state(&b, "ok", Duration::from_secs(120)).await;
        let input = b
            .find(Locator::Css(".xterm-helper-textarea"))
            .await
            .expect("the terminal's input");
        input
            .send_keys("echo hi-$((6*7))\u{E007}")
            .await
            .expect("type");
        wait_line(&b, "hi-42", Duration::from_secs(60)).await;

        // Resize follows the window (fit addon) and reaches the guest.
        let cols_now = || async {
            b.execute("return window.bhattiTerm.cols", vec![])
                .await
                .expect("cols")
        };
        let before = cols_now().await;
        b.set_window_size(700, 500).await.expect("resize");
        // The page fits the terminal on the window's resize event, which
        // comes a moment after the WebDriver call returns.
        let deadline = Instant::now() + Duration::from_secs(30);
        let cols = loop {
            let c = cols_now().await;
            if c != before {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal kept {before} columns after the window shrank"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        input
            .send_keys("echo cols-$(stty size | cut -d' ' -f2)\u{E007}")
            .await
            .expect("type");
        wait_line(&b, &format!("cols-{cols}"), Duration::from_secs(60)).await;

        // A reload reattaches the same session and replays its output.
        b.refresh().await.expect("reload");
        wait_state(&b, "ok", Duration::from_secs(60)).await;
        wait_line(&b, "hi-42", Duration::from_secs(60)).await;

        // Revoking closes the open page's socket, and the link is refused.
        let (code, stdout, stderr) = cli(port, &key, &["share", "web", "--revoke"]).await;
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("revoked"), "{stdout}");
        let status = wait_state(&b, "error", Duration::from_secs(30)).await;
        assert!(status.contains("expired or revoked"), "{status}");
        check(format!("/_shell/{id}/token")).await.expect_err(401);
        assert_eq!(
            ws_status(&anon, &format!("/_shell/{id}/ws"), &protocols).await,
            401
        );
        b.goto(&link).await.expect("open the revoked link");
        let status = wait_state(&b, "error", Duration::from_secs(30)).await;
        assert!(status.contains("expired or revoked"), "{status}");

        // An expired link is refused too.
        let expired = format!("bhs_{}", "ab".repeat(32));
        store
            .with(|c| {
                c.execute(
                    "INSERT INTO shell_tokens (token_sha256, owner, sandbox_id, created_at, expires_at)
                     SELECT ?1, owner, id, ?2, ?3 FROM sandboxes WHERE id = ?4",
                    rusqlite::params![
                        bhatti::auth::hash_key(&expired),
                        bhatti::store::now_ms() - 2000,
                        bhatti::store::now_ms() - 1000,
                        id
                    ],
                )?;
                Ok(())
            })
            .expect("insert an expired token");
        assert_eq!(
            ws_status(
                &anon,
                &format!("/_shell/{id}/ws"),
                &format!("bhatti-shell, {expired}")
            )
            .await,
            401
        );
        b.goto(&format!(
            "http://127.0.0.1:{port}/_shell/{id}#token={expired}"
        ))
        .await
        .expect("open the expired link");
        let status = wait_state(&b, "error", Duration::from_secs(30)).await;
        assert!(status.contains("expired or revoked"), "{status}");
    };
    // Catch a failure so the browser session still ends (the driver's drop
    // kills the rest either way).
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(result)).await;
    let _ = b.close().await;
    drop(driver);
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }

    a.delete("/sandboxes/web").await.expect(204);
    daemon.stop().await;
}
