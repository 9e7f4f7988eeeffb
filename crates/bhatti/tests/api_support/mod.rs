//! Shared by the `api_*` tests: a real daemon (in-process `daemon::serve`,
//! or the `bhatti serve` binary) on a temp unix socket, with its own data
//! dir and network namespace, removed on drop even when a test fails; an
//! HTTP client and a WebSocket client over that socket.
//!
//! Artifacts: `BHATTI_KERNEL` / `BHATTI_ROOTFS` (else the newest in
//! `/var/cache/bhatti-ci`), as `engine_linux.rs` finds them. Missing ones
//! (or not being root) skip a test with one line.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bhatti::config::{Backend, Config, DiskStrategy};
use bhatti::store::users::UserCaps;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub use bhatti_testkit::Artifacts;

/// Kernel and rootfs (and QEMU), or `None` after one SKIP line.
pub fn artifacts(test: &str) -> Option<Artifacts> {
    if bhatti_vmm::probe::probe().qemu.is_none() {
        bhatti_testkit::skip(test, "missing qemu");
        return None;
    }
    bhatti_testkit::artifacts(test)
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "bhatti=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A data dir, a socket path and a netns; everything under them is
/// removed on drop (VMMs killed, XFS loop unmounted, netns deleted).
pub struct Env {
    pub dir: tempfile::TempDir,
    pub ns: String,
    pub art: Artifacts,
}

impl Env {
    pub fn new(art: Artifacts) -> Env {
        let ns = format!("bhatti-a-{}", bhatti::engine::random_hex(4));
        let dir = tempfile::Builder::new()
            .prefix("bhatti-api-test.")
            .tempdir()
            .expect("tempdir");
        Env { dir, ns, art }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("bhatti.sock")
    }

    pub fn config(&self) -> Config {
        let mut c = Config {
            data_dir: self.data_dir(),
            listen_unix: self.sock(),
            listen_tcp: None,
            ..Config::default()
        };
        c.vm.backend = Backend::Qemu;
        c.vm.kernel = self.art.kernel.clone();
        c.vm.rootfs = self.art.rootfs.clone();
        c.vm.boot_timeout_secs = 180;
        c.vm.agent_timeout_secs = 60;
        c.vm.disk_strategy = DiskStrategy::Auto;
        c.vm.xfs_loop_size_mb = 16 << 10;
        c.network.netns = Some(self.ns.clone());
        c.network.dns_upstreams = vec![];
        c.thermal.warm_after_secs = 0;
        c.thermal.cold_after_secs = 0;
        c.limits.rate.read_per_second = 100;
        c.limits.rate.read_burst = 200;
        c.limits.rate.create_per_minute = 600;
        c.limits.rate.create_burst = 100;
        c
    }

    /// Writes `<dir>/bhatti.toml` for [`Proc::spawn`].
    pub fn write_config(&self, config: &Config) {
        let text = toml::to_string(config).expect("config TOML");
        std::fs::write(self.dir.path().join("bhatti.toml"), text).expect("write config");
    }

    /// Pids of the VMM processes whose command line names this data dir.
    pub fn vmm_pids(&self) -> Vec<u32> {
        let needle = self.data_dir().display().to_string();
        let mut v = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                v.push(pid);
            }
        }
        v
    }

    /// Creates a user directly in the store; returns the API key.
    pub fn user(&self, name: &str, caps: UserCaps) -> String {
        let store = bhatti::store::Store::open(self.data_dir().join("bhatti.db")).expect("store");
        store
            .with(|c| {
                Ok(bhatti::auth::create_user(c, name, caps)
                    .expect("create user")
                    .api_key)
            })
            .expect("user")
    }

    pub fn client(&self, key: Option<&str>) -> Client {
        Client {
            sock: self.sock(),
            key: key.map(str::to_owned),
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        bhatti_testkit::clean_data_dir(&self.data_dir());
        bhatti_testkit::delete_netns(&self.ns);
    }
}

/// The in-process daemon.
pub struct Daemon {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), bhatti::daemon::DaemonError>>>,
}

impl Daemon {
    pub async fn start(env: &Env, config: Config) -> Daemon {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(bhatti::daemon::serve(config, async move {
            let _ = rx.await;
        }));
        let mut d = Daemon {
            stop: Some(tx),
            task: Some(task),
        };
        d.wait_ready(env).await;
        d
    }

    async fn wait_ready(&mut self, env: &Env) {
        let c = env.client(None);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = c.try_send(Method::GET, "/health", &[], Bytes::new()).await {
                if r.status == StatusCode::OK {
                    return;
                }
            }
            if let Some(t) = &self.task {
                if t.is_finished() {
                    let r = self.task.take().expect("task").await;
                    panic!("the daemon ended during start: {r:?}");
                }
            }
            assert!(Instant::now() < deadline, "the daemon did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Graceful shutdown; VMs keep running.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("daemon stops within 30 s");
            r.expect("daemon task").expect("daemon result");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The daemon as users run it: `bhatti serve --config <dir>/bhatti.toml`
/// as a child process, logging to `<dir>/daemon-<n>.log`; killed on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(env: &Env, n: u32) -> Proc {
        Proc::spawn_with(env, n, &[])
    }

    /// [`Proc::spawn`] with extra environment variables (they win).
    pub fn spawn_with(env: &Env, n: u32, vars: &[(&str, &str)]) -> Proc {
        let cfg = env.dir.path().join("bhatti.toml");
        let log =
            std::fs::File::create(env.dir.path().join(format!("daemon-{n}.log"))).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_bhatti"))
            .args(["serve", "--config"])
            .arg(&cfg)
            // `vars` may set another RUST_LOG.
            .env("RUST_LOG", "bhatti=info")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn bhatti serve");
        Proc { child }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal");
    }

    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the spawned daemon answers `/health`; panics with its log
/// when it exits first.
pub async fn ready(env: &Env, p: &mut Proc, n: u32) {
    let c = env.client(None);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = c
            .try_send(hyper::Method::GET, "/health", &[], bytes::Bytes::new())
            .await
        {
            if r.status == 200 {
                return;
            }
        }
        if let Some(s) = p.child.try_wait().expect("try_wait") {
            let log = std::fs::read_to_string(env.dir.path().join(format!("daemon-{n}.log")))
                .unwrap_or_default();
            panic!("the daemon exited ({s}) during start:\n{log}");
        }
        assert!(Instant::now() < deadline, "the daemon did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Asserts the status, returning the JSON body (Null when empty).
    #[track_caller]
    pub fn expect(&self, status: u16) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        if self.body.is_empty() {
            Value::Null
        } else if self
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
        {
            self.json()
        } else {
            Value::String(String::from_utf8_lossy(&self.body).into_owned())
        }
    }

    /// An error response with its `{"error"}` body.
    #[track_caller]
    pub fn expect_err(&self, status: u16) -> String {
        let v = self.expect(status);
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {v}"))
            .to_owned()
    }
}

/// HTTP over the daemon's unix socket, one connection per request.
#[derive(Debug, Clone)]
pub struct Client {
    pub sock: PathBuf,
    pub key: Option<String>,
}

impl Client {
    pub fn with_key(&self, key: &str) -> Client {
        Client {
            sock: self.sock.clone(),
            key: Some(key.to_owned()),
        }
    }

    pub async fn open(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> std::io::Result<Response<Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.sock).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://localhost{path}"))
            .header("host", "localhost");
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(std::io::Error::other)?;
        sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)
    }

    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> std::io::Result<Resp> {
        let resp = self.open(method, path, headers, body).await?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Resp {
        self.try_send(method.clone(), path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.send(Method::DELETE, path, &[], Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.send(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
        )
        .await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Resp {
        self.send(
            Method::PATCH,
            path,
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: impl Into<Bytes>) -> Resp {
        self.send(Method::PUT, path, &[], body.into()).await
    }

    /// Buffered exec of `sh -c script`; returns (exit, stdout, stderr).
    pub async fn sh(&self, sandbox: &str, script: &str) -> (i64, String, String) {
        let v = self
            .post(
                &format!("/sandboxes/{sandbox}/exec"),
                serde_json::json!({"cmd": ["sh", "-c", script]}),
            )
            .await
            .expect(200);
        (
            v["exit_code"].as_i64().unwrap_or(-1),
            v["stdout"].as_str().unwrap_or_default().to_owned(),
            v["stderr"].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// A WebSocket to `path` (query included).
    pub async fn ws(
        &self,
        path: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>,
        tokio_tungstenite::tungstenite::Error,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let stream = tokio::net::UnixStream::connect(&self.sock)
            .await
            .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
        let mut req = format!("ws://localhost{path}").into_client_request()?;
        if let Some(k) = &self.key {
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {k}").parse().expect("header value"),
            );
        }
        let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
        Ok(ws)
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The names in a directory (none when it is missing).
pub fn dir_entries(p: &std::path::Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The Python that runs the E2B SDK tests: `E2B_PYTHON`, else `python3`
/// (scripts/install-deps.sh installs `e2b`, `pytest` and `pytest-asyncio`
/// into it), if it imports `modules` (e.g. `"e2b, pytest"`); else one SKIP
/// line, or a failure under `BHATTI_REQUIRE_VMS`.
pub fn e2b_python(test: &str, modules: &str) -> Option<String> {
    let python = std::env::var("E2B_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bhatti_testkit::skip(
            test,
            &format!("{python} cannot import {modules} (scripts/install-deps.sh)"),
        );
        return None;
    }
    Some(python)
}

/// Runs the SDK script `tests/e2b/<script>` with `python` (see
/// [`e2b_python`]) against the E2B API at `url` as `key`, for at most
/// 300 s. Whether it exited 0, and its stdout and stderr.
pub async fn run_e2b_script(
    python: &str,
    script: &str,
    args: &[String],
    key: &str,
    url: &str,
) -> (bool, String) {
    let path = format!("{}/tests/e2b/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(python)
            .arg(path)
            .args(args)
            .env("E2B_API_KEY", key)
            .env("E2B_API_URL", url)
            .env("E2B_SANDBOX_URL", url)
            // No __pycache__ in the tree (sdk_attach.py is imported).
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the SDK script ends within 300 s")
    .expect("python runs");
    // The exit status too: a silent non-zero exit says nothing otherwise.
    let text = format!(
        "{}{}[{}]",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status
    );
    (out.status.success(), text)
}
