//! Test harness: runs the real `lohar` binary in host test mode on a unix
//! socket in a temp dir, and connects the real protocol client to it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bhatti_protocol::AgentClient;

pub const TOKEN: &str = "test-token-0123456789";

pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
}

impl TestAgent {
    /// Starts lohar with default flags plus `extra`.
    pub fn start(extra: &[&str]) -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_lohar"))
            .arg("serve")
            .arg("--unix")
            .arg(&socket)
            .args(["--token", TOKEN])
            .args(extra)
            .env("LOHAR_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn lohar");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "lohar did not create its socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        TestAgent { dir, socket, child }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects, retrying while the agent has bound its socket but is not
    /// listening yet (connect is refused in that window).
    pub async fn raw(&self) -> tokio::net::UnixStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::UnixStream::connect(&self.socket).await {
                Ok(s) => return s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
    }

    pub async fn client(&self) -> AgentClient {
        AgentClient::connect(self.raw().await, TOKEN)
            .await
            .expect("handshake")
    }

    /// True while the agent process is alive (it must survive bad input).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some` or the deadline passes.
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// True if a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

pub fn file_exists(p: &Path) -> bool {
    p.exists()
}
