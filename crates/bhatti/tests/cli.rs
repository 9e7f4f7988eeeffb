//! The `bhatti` binary driven as a user drives it, against a real daemon
//! (`bhatti serve` as a child process) booting real VMs.
//!
//! Needs root, a kernel (`BHATTI_KERNEL`, else the newest
//! `/var/cache/bhatti-ci/kernel/*/vmlinux`) and a rootfs with lohar
//! (`BHATTI_ROOTFS`, else the newest `/var/cache/bhatti-ci/rootfs/*/rootfs+lohar.ext4`);
//! without them the VM test prints one SKIP line. The daemon gets its own
//! data dir, socket and network namespace, all removed afterwards, even on
//! failure ([`Daemon`]'s `Drop`). One VM serves the whole flow: a boot under
//! TCG takes seconds.
//!
//! The tests without a daemon (usage errors, unreachable daemon, setup
//! validation) run everywhere.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");
/// Longest any one CLI command may take (a create boots a VM under TCG).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Kernel and rootfs, or `None` after one SKIP line.
fn artifacts(test: &str) -> Option<(PathBuf, PathBuf)> {
    bhatti_testkit::artifacts(test).map(|a| (a.kernel, a.rootfs))
}

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Asserts success and returns self.
    fn ok(self, what: &str) -> Run {
        assert_eq!(
            self.code, 0,
            "{what}: exit {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Asserts a failure with `code` and exactly one line on stderr.
    fn fails(self, what: &str, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "{what}: expected exit {code}\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "{what}: the error should be one line: {:?}",
            self.stderr
        );
        assert!(
            self.stderr.starts_with("bhatti: "),
            "{what}: {:?}",
            self.stderr
        );
        self
    }
}

/// Runs the binary with `envs` (and nothing inherited that would change
/// which daemon or key it uses), feeding `stdin`, within [`COMMAND_TIMEOUT`].
fn bhatti(home: &Path, envs: &[(&str, &str)], args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("BHATTI_URL")
        .env_remove("BHATTI_TOKEN")
        .env_remove("BHATTI_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", home)
        .envs(envs.iter().copied())
        // Relative paths in arguments (`--file ./local:/…`) are under home.
        .current_dir(home)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn bhatti");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out: Output = match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(r) => r.expect("wait for bhatti"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
            panic!("bhatti {args:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
    };
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A daemon child with its own data dir, socket and network namespace.
struct Daemon {
    dir: tempfile::TempDir,
    netns: String,
    child: Option<Child>,
    config: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start(kernel: &Path, rootfs: &Path) -> Daemon {
        Daemon::start_as(kernel, rootfs, false)
    }

    /// `verbatim`: `bhatti serve` with no flags, run from its data dir, the
    /// config found through `BHATTI_CONFIG` (as `sudo bhatti serve` in
    /// `/var/lib/bhatti` finds `/etc/bhatti/config.toml`).
    fn start_as(kernel: &Path, rootfs: &Path, verbatim: bool) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("bhatti-cli.")
            .tempdir()
            .expect("tempdir");
        let netns = format!("bhatti-cli-{}", bhatti::engine::random_hex(4));
        let socket = dir.path().join("bhatti.sock");
        let config = dir.path().join("config.toml");
        let toml = format!(
            r#"data_dir = {data:?}
listen_unix = {socket:?}
listen_tcp = ""

[vm]
kernel = {kernel:?}
rootfs = {rootfs:?}
boot_timeout_secs = 240
agent_timeout_secs = 60

[network]
netns = {netns:?}

[thermal]
warm_after_secs = 0
cold_after_secs = 0
"#,
            data = dir.path().join("data"),
        );
        std::fs::write(&config, toml).expect("write config");
        std::fs::create_dir_all(dir.path().join("home")).expect("home");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log");
        let mut cmd = Command::new(BIN);
        if verbatim {
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data).expect("data dir");
            cmd.arg("serve")
                .current_dir(data)
                .env("BHATTI_CONFIG", &config);
        } else {
            cmd.args(["serve", "--config"]).arg(&config);
        }
        let child = cmd
            .env("RUST_LOG", "bhatti=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn bhatti serve");
        let mut d = Daemon {
            dir,
            netns,
            child: Some(child),
            config,
            socket,
        };
        d.wait_ready();
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Waits (bounded) until `/health` answers on the socket; fails at once
    /// when the daemon exits.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "bhatti serve exited ({status}) before it was ready:\n{}",
                    self.log()
                );
            }
            if health(&self.socket) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "bhatti serve did not answer /health within 120 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn config_arg(&self) -> String {
        self.config.display().to_string()
    }
}

/// One `GET /health` over the unix socket, true on a 200.
fn health(socket: &Path) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // VMMs outlive the daemon by design: end any this test left (their
        // command lines name files under our temp dir).
        let marker = self.dir.path().to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() as i32
                && String::from_utf8_lossy(&cmdline).contains(&marker)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        // Mounts the daemon made under the data dir (the XFS loop image of
        // the disk strategy on hosts without reflink); a killed VMM may hold
        // its disk a moment longer than its pid shows, so retry briefly.
        let mounts = || -> Vec<String> {
            std::fs::read_to_string("/proc/mounts")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|m| m.starts_with(&marker))
                .map(str::to_string)
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !mounts().is_empty() && Instant::now() < deadline {
            for m in mounts().iter().rev() {
                let _ = Command::new("umount")
                    .args(["-d", m])
                    .stderr(Stdio::null())
                    .status();
            }
            if !mounts().is_empty() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        bhatti_testkit::delete_netns(&self.netns);
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}

/// `bhatti` on a pseudo-terminal (stdin and stdout), as a person at a
/// terminal runs it; stderr is captured apart.
struct PtyRun {
    master: std::fs::File,
    output: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
    done: std::sync::mpsc::Receiver<Output>,
}

impl PtyRun {
    fn spawn(home: &Path, envs: &[(&str, &str)], args: &[&str]) -> PtyRun {
        let ws = nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
        let slave_in = pty.slave.try_clone().expect("dup pty");
        let child = Command::new(BIN)
            .args(args)
            .env_remove("BHATTI_URL")
            .env_remove("BHATTI_TOKEN")
            .env_remove("XDG_CONFIG_HOME")
            .env("HOME", home)
            .envs(envs.iter().copied())
            .stdin(Stdio::from(slave_in))
            .stdout(Stdio::from(pty.slave))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bhatti on a pty");
        let master = std::fs::File::from(pty.master);
        let mut reader = master.try_clone().expect("dup master");
        let (tx, output) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            // EIO once every slave end is closed.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let (dtx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = dtx.send(child.wait_with_output().expect("wait"));
        });
        PtyRun {
            master,
            output,
            seen: Vec::new(),
            done,
        }
    }

    /// Everything shown so far once `needle` is among it.
    fn until(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !String::from_utf8_lossy(&self.seen).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(b) => self.seen.extend_from_slice(&b),
                Err(_) => panic!(
                    "{needle:?} did not show up; the terminal shows {:?}",
                    String::from_utf8_lossy(&self.seen)
                ),
            }
        }
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    fn type_bytes(&mut self, b: &[u8]) {
        self.master.write_all(b).expect("write to the pty");
    }

    /// Exit code and stderr, and everything the terminal showed.
    fn finish(mut self) -> (i32, String, String) {
        let out = self
            .done
            .recv_timeout(COMMAND_TIMEOUT)
            .expect("bhatti on the pty did not exit");
        // The reader ends (EIO) once the child, the last holder of the
        // slave side, is gone.
        while let Ok(b) = self.output.recv_timeout(COMMAND_TIMEOUT) {
            self.seen.extend_from_slice(&b);
        }
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            String::from_utf8_lossy(&self.seen).into_owned(),
        )
    }
}

/// Detach with Ctrl+\, let output happen while detached, reattach: the
/// replay has what was missed and nothing already shown.
fn shell_detach_and_reattach(home: &Path, env: &[(&str, &str)]) {
    let script = "echo one-$((0+1)); while [ ! -f /tmp/go ]; do sleep 0.05; done; echo two-$((1+1)); read x; echo got-$x; exit 4";
    let mut first = PtyRun::spawn(home, env, &["shell", "dev", "--", "sh", "-c", script]);
    first.until("one-1");
    first.type_bytes(&[0x1c]);
    let (code, stderr, _) = first.finish();
    assert_eq!(code, 0, "detach exits 0: {stderr}");
    let session = stderr
        .split("--session ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no reattach hint in {stderr:?}"))
        .to_string();
    let offsets = std::fs::read_to_string(home.join(".config/bhatti/sessions.json"))
        .expect("offsets saved on detach");
    assert!(offsets.contains(&session), "{offsets}");

    bhatti(home, env, &["exec", "dev", "--", "touch", "/tmp/go"], None).ok("trigger");
    let mut second = PtyRun::spawn(home, env, &["shell", "dev", "--session", &session]);
    second.until("two-2");
    second.type_bytes(b"hello\r");
    let (code, stderr, shown) = second.finish();
    assert_eq!(code, 4, "the session's exit code passes through: {stderr}");
    assert!(shown.contains("got-hello"), "{shown:?}");
    assert!(
        !shown.contains("one-1"),
        "bytes shown before the detach were repeated: {shown:?}"
    );
    assert_eq!(shown.matches("two-2").count(), 1, "{shown:?}");
    let offsets =
        std::fs::read_to_string(home.join(".config/bhatti/sessions.json")).unwrap_or_default();
    assert!(
        !offsets.contains(&session),
        "an ended session is forgotten: {offsets}"
    );
}

#[test]
fn cli_against_a_real_daemon() {
    let Some((kernel, rootfs)) = artifacts("cli_against_a_real_daemon") else {
        return;
    };
    let d = Daemon::start(&kernel, &rootfs);
    let home = d.home();
    let cfg = d.config_arg();

    // Host admin: a user, its key shown once.
    let user = bhatti(
        &home,
        &[],
        &[
            "user", "create", "--name", "tester", "--json", "--config", &cfg,
        ],
        None,
    )
    .ok("user create")
    .json();
    assert_eq!(user["name"], "tester");
    let key = user["api_key"].as_str().expect("api_key").to_string();
    assert!(key.starts_with("bht_"), "{key}");
    let users = bhatti(
        &home,
        &[],
        &["user", "list", "--json", "--config", &cfg],
        None,
    )
    .ok("user list")
    .json();
    assert_eq!(users["users"][0]["name"], "tester");
    bhatti(
        &home,
        &[],
        &["user", "create", "--name", "tester", "--config", &cfg],
        None,
    )
    .fails("duplicate user", 1);

    let url = d.url();
    let env = [("BHATTI_URL", url.as_str()), ("BHATTI_TOKEN", key.as_str())];
    let b = |args: &[&str]| bhatti(&home, &env, args, None);
    let b_in = |args: &[&str], input: &[u8]| bhatti(&home, &env, args, Some(input));

    // Create (idempotent), list, inspect.
    let sb = b(&["create", "dev", "--label", "team=a", "--json"])
        .ok("create")
        .json();
    assert_eq!(sb["name"], "dev");
    assert_eq!(sb["status"], "running");
    let id = sb["id"].as_str().expect("id").to_string();
    let again = b(&["create", "dev", "--json"]).ok("create again").json();
    assert_eq!(again["id"], id.as_str(), "create is idempotent by name");
    let list = b(&["list", "--json"]).ok("list").json();
    let names: Vec<&str> = list["sandboxes"]
        .as_array()
        .expect("sandboxes array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["dev"]);
    let human = b(&["list"]).ok("list (table)");
    assert!(human.stdout.starts_with("NAME"), "{}", human.stdout);
    assert!(human.stdout.contains(&id), "{}", human.stdout);
    assert_eq!(
        b(&["inspect", &id, "--json"]).ok("inspect by id").json()["name"],
        "dev"
    );

    // Exec: streams, stderr apart, the exit code passes through.
    let r = b(&[
        "exec",
        "dev",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(r.code, 7, "exit code passes through: {}", r.stderr);
    assert_eq!(r.stdout, "out\n");
    assert!(r.stderr.contains("err"), "{:?}", r.stderr);
    assert_eq!(b(&["exec", "dev", "--", "true"]).code, 0);
    // Piped stdin reaches the command.
    let r = b_in(
        &["exec", "dev", "--", "sh", "-c", "tr a-z A-Z"],
        b"hello stdin\n",
    )
    .ok("exec stdin");
    assert_eq!(r.stdout, "HELLO STDIN\n");
    // --json: one document, the code still passes through.
    let r = b(&[
        "exec",
        "dev",
        "--json",
        "--",
        "sh",
        "-c",
        "printf x; exit 3",
    ]);
    assert_eq!(r.code, 3);
    let v = r.json();
    assert_eq!(
        (v["exit_code"].as_i64(), v["stdout"].as_str()),
        (Some(3), Some("x"))
    );
    // Env and cwd.
    let r = b(&[
        "exec",
        "dev",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\" $(pwd)",
    ])
    .ok("exec env cwd");
    assert_eq!(r.stdout, "hi there /tmp\n");

    // Files: write from stdin, read back byte for byte, list.
    let content: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let w = b_in(
        &["file", "write", "dev", "/tmp/cli/blob.bin", "--json"],
        &content,
    )
    .ok("file write");
    assert_eq!(w.json()["bytes"].as_u64(), Some(content.len() as u64));
    let out = Command::new(BIN)
        .args(["file", "read", "dev", "/tmp/cli/blob.bin"])
        .env("HOME", &home)
        .envs(env)
        .output()
        .expect("file read");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == content,
        "file read returned {} bytes, not the {} written",
        out.stdout.len(),
        content.len()
    );
    let r = b(&["file", "read", "dev", "/tmp/cli/blob.bin", "--json"]).ok("file read --json");
    assert_eq!(r.json()["encoding"], "base64");
    let ls = b(&["file", "ls", "dev", "/tmp/cli", "--json"])
        .ok("file ls")
        .json();
    assert!(ls.to_string().contains("blob.bin"), "{ls}");
    b(&["file", "read", "dev", "/tmp/cli/missing"]).fails("read a missing file", 1);
    b(&["file", "read", "dev", "relative"]).fails("relative path", 2);

    // Edit labels.
    let e = b(&[
        "edit",
        "dev",
        "--label",
        "env=test",
        "--keep-hot",
        "true",
        "--json",
    ])
    .ok("edit")
    .json();
    assert_eq!(e["labels"]["team"], "a");
    assert_eq!(e["labels"]["env"], "test");
    assert_eq!(e["keep_hot"], true);

    // Network: the policy, the gateway and the DNS name in inspect.
    let e = b(&[
        "edit",
        "dev",
        "--allow",
        "203.0.113.0/24:443",
        "--deny",
        "198.51.100.7",
        "--json",
    ])
    .ok("edit --allow")
    .json();
    assert_eq!(e["network"]["egress"], "deny", "{e}");
    assert_eq!(e["network"]["allow"][0], "203.0.113.0/24:443", "{e}");
    assert_eq!(e["network"]["deny"][0], "198.51.100.7/32", "{e}");
    let human = b(&["inspect", "dev"]).ok("inspect (fields)").stdout;
    for want in ["gateway", "dev.sb", "deny; allow 203.0.113.0/24:443"] {
        assert!(human.contains(want), "{want} in {human}");
    }
    let e = b(&["edit", "dev", "--internet", "--json"])
        .ok("edit --internet")
        .json();
    assert_eq!(e["network"]["egress"], "allow", "{e}");
    assert_eq!(e["network"]["allow"].as_array().map(Vec::len), Some(0));
    b(&["edit", "dev", "--allow", "10.1.2.3/8"]).fails("a rule with host bits", 2);
    b(&["edit", "dev", "--no-internet", "--internet"]).fails("both", 2);
    // The host sees the user's network.
    let st = bhatti(
        &home,
        &[],
        &["admin", "status", "--json", "--config", &cfg],
        None,
    )
    .ok("admin status")
    .json();
    let nets = st["networks"].as_array().expect("networks");
    assert_eq!(nets.len(), 1, "{st}");
    assert_eq!(nets[0]["user"], "tester");
    assert_eq!(nets[0]["bridge_up"], true, "{st}");
    assert_eq!(nets[0]["sandboxes"], 1);
    let iso = bhatti(
        &home,
        &[],
        &[
            "user", "isolate", "tester", "true", "--json", "--config", &cfg,
        ],
        None,
    )
    .ok("user isolate")
    .json();
    assert_eq!(iso["isolated"], true);
    bhatti(
        &home,
        &[],
        &["user", "isolate", "tester", "maybe", "--config", &cfg],
        None,
    )
    .fails("user isolate maybe", 2);

    // A shell over the WebSocket with piped input: the exit code passes through.
    let r = b_in(&["shell", "dev"], b"echo shell-$((40+2))\nexit 5\n");
    assert_eq!(r.code, 5, "shell exit code: {}", r.stderr);
    assert!(r.stdout.contains("shell-42"), "{:?}", r.stdout);
    shell_detach_and_reattach(&home, &env);
    let ps = b(&["ps", "dev", "--json"]).ok("ps").json();
    assert!(ps["sessions"].is_array(), "{ps}");

    // Secrets: the value from stdin, never shown.
    b_in(&["secret", "set", "CLI_TOKEN"], b"s3cret\n").ok("secret set");
    let secrets = b(&["secret", "list", "--json"]).ok("secret list");
    assert!(secrets.stdout.contains("CLI_TOKEN") && !secrets.stdout.contains("s3cret"));
    b(&["secret", "delete", "CLI_TOKEN"]).ok("secret delete");

    // Checkpoint, stop, start.
    let cp = b(&["snapshot", "create", "dev", "cp-one", "--json"])
        .ok("snapshot create")
        .json();
    assert_eq!(cp["name"], "cp-one");
    let cps = b(&["snapshot", "list", "--json"])
        .ok("snapshot list")
        .json();
    assert!(cps["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .any(|c| c["name"] == "cp-one"));
    b(&["exec", "dev", "--", "sh", "-c", "echo kept > /tmp/state"]).ok("write state");
    let st = b(&["stop", "dev", "--json"]).ok("stop").json();
    assert_eq!(st["status"], "stopped");
    assert_eq!(
        b(&["inspect", "dev", "--json"])
            .ok("inspect stopped")
            .json()["status"],
        "stopped"
    );
    b(&["start", "dev"]).ok("start");
    let r = b(&["exec", "dev", "--", "cat", "/tmp/state"]).ok("state after start");
    assert_eq!(r.stdout, "kept\n");

    // Errors: one line, non-zero.
    b(&["inspect", "nosuch"]).fails("unknown sandbox", 1);
    b(&["exec", "nosuch", "--", "true"]).fails("exec on an unknown sandbox", 255);
    b(&["create", "Bad_Name"]).fails("bad name", 2);
    bhatti(&home, &[("BHATTI_URL", url.as_str())], &["list"], None).fails("no key", 1);
    bhatti(
        &home,
        &[("BHATTI_URL", url.as_str()), ("BHATTI_TOKEN", "bht_wrong")],
        &["list"],
        None,
    )
    .fails("wrong key", 1);

    // setup writes a private config that later commands use.
    bhatti(
        &home,
        &[],
        &["setup", "--url", &url, "--token", &key, "--json"],
        None,
    )
    .ok("setup");
    let cfg_file = home.join(".config/bhatti/config.toml");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cfg_file)
            .expect("config file")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    bhatti(&home, &[], &["list", "--json"], None).ok("list via the saved config");

    // Clean up through the CLI.
    b(&["snapshot", "delete", "cp-one"]).ok("snapshot delete");
    b(&["destroy", "dev"]).ok("destroy");
    let list = b(&["list", "--json"]).ok("list after destroy").json();
    assert_eq!(list["sandboxes"].as_array().map(Vec::len), Some(0));
    b(&["destroy", "dev"]).fails("destroy twice", 1);
    bhatti(
        &home,
        &[],
        &["user", "delete", "tester", "--config", &cfg],
        None,
    )
    .ok("user delete");
}

/// One HTTP/1.1 request over the daemon's unix socket: (status, body),
/// a chunked body decoded.
fn http(
    socket: &Path,
    key: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(COMMAND_TIMEOUT)).expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write request");
    s.write_all(body).expect("write body");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read response");
    let split = memchr::memmem::find(&resp, b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&resp[..split]).to_ascii_lowercase();
    let status: u16 = head[9..12].parse().expect("status");
    let mut rest = &resp[split + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return (status, rest.to_vec());
    }
    let mut out = Vec::new();
    loop {
        let eol = memchr::memmem::find(rest, b"\r\n").expect("chunk size line");
        let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
            .expect("chunk size");
        if n == 0 {
            return (status, out);
        }
        out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
        rest = &rest[eol + 2 + n + 2..];
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>;

/// Opens `/sandboxes/{sb}/exec/ws` and sends the first message.
async fn exec_ws(socket: &Path, key: &str, sb: &str, first: Value) -> Ws {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://localhost/sandboxes/{sb}/exec/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header"),
    );
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("exec/ws handshake");
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        first.to_string(),
    ))
    .await
    .expect("first message");
    ws
}

/// The next JSON message (a deadline, never a hang).
async fn ws_next(ws: &mut Ws) -> Value {
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(120), ws.next())
            .await
            .expect("an exec/ws message within 120 s")
            .expect("the socket closed early")
            .expect("exec/ws read");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).expect("JSON message");
        }
    }
}

/// A piped session: start, read some, drop the socket (detach), reattach
/// from the last `end` seen; every line exactly once. Stdin echo through
/// `cat`; DELETE kills; `bhatti kill` kills.
fn piped_sessions(socket: &Path, key: &str, home: &Path) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let script = "for i in $(seq 1 200); do echo line-$i; sleep 0.01; done; echo err-line >&2";
        let mut ws = exec_ws(socket, key, "project", json!({"cmd": ["sh", "-c", script]})).await;
        let started = ws_next(&mut ws).await;
        assert_eq!(started["type"], "started", "{started}");
        assert_eq!(started["offset"], 0);
        let sid = started["session"].as_str().expect("session").to_string();
        let mut text = String::new();
        let mut end = 0u64;
        while !text.contains("line-20\n") {
            let m = ws_next(&mut ws).await;
            assert_eq!(m["type"], "stdout", "{m}");
            assert_eq!(m["offset"].as_u64(), Some(end), "contiguous: {m}");
            text.push_str(m["data"].as_str().expect("utf-8 data"));
            end = m["end"].as_u64().expect("end");
        }
        drop(ws); // detach: the command runs on
        let mut ws = exec_ws(
            socket,
            key,
            "project",
            json!({"attach": sid, "offset": end}),
        )
        .await;
        let again = ws_next(&mut ws).await;
        assert_eq!(again["type"], "started", "{again}");
        assert_eq!(again["offset"].as_u64(), Some(end));
        assert!(again.get("gap").is_none(), "{again}");
        let mut stderr = String::new();
        let exit = loop {
            let m = ws_next(&mut ws).await;
            match m["type"].as_str() {
                Some("stdout") => text.push_str(m["data"].as_str().expect("data")),
                Some("stderr") => stderr.push_str(m["data"].as_str().expect("data")),
                Some("exit") => break m,
                _ => panic!("unexpected {m}"),
            }
        };
        assert_eq!(exit["exit_code"], 0, "{exit}");
        let want: String = (1..=200).map(|i| format!("line-{i}\n")).collect();
        assert_eq!(text, want, "no output lost or repeated across the reattach");
        assert_eq!(stderr, "err-line\n");

        // Stdin through cat, eof ends it.
        let mut ws = exec_ws(socket, key, "project", json!({"cmd": ["cat"]})).await;
        assert_eq!(ws_next(&mut ws).await["type"], "started");
        ws.send(Message::text(
            json!({"type": "stdin", "data": "hello "}).to_string(),
        ))
        .await
        .expect("stdin");
        ws.send(Message::binary(b"world\n".to_vec()))
            .await
            .expect("stdin");
        ws.send(Message::text(r#"{"type":"eof"}"#))
            .await
            .expect("eof");
        let mut echoed = String::new();
        let exit = loop {
            let m = ws_next(&mut ws).await;
            match m["type"].as_str() {
                Some("stdout") => echoed.push_str(m["data"].as_str().expect("data")),
                Some("exit") => break m,
                _ => panic!("unexpected {m}"),
            }
        };
        assert_eq!(echoed, "hello world\n");
        assert_eq!(exit["exit_code"], 0);

        // A bad first message: an error, nothing started.
        let mut ws = exec_ws(socket, key, "project", json!({"cmd": []})).await;
        let m = ws_next(&mut ws).await;
        assert_eq!(m["type"], "error", "{m}");

        // DELETE kills; an attached client sees the exit.
        let mut ws = exec_ws(socket, key, "project", json!({"cmd": ["sleep", "600"]})).await;
        let sid = ws_next(&mut ws).await["session"]
            .as_str()
            .expect("session")
            .to_string();
        let (status, body) = http(
            socket,
            key,
            "DELETE",
            &format!("/sandboxes/project/sessions/{sid}"),
            &[],
            b"",
        );
        assert_eq!(status, 204, "{}", String::from_utf8_lossy(&body));
        let exit = ws_next(&mut ws).await;
        assert_eq!(exit["type"], "exit", "{exit}");
        assert_eq!(exit["exit_code"], 128 + 9);
        let (status, _) = http(
            socket,
            key,
            "DELETE",
            "/sandboxes/project/sessions/nosuch",
            &[],
            b"",
        );
        assert_eq!(status, 404);

        // `bhatti kill SANDBOX SESSION`.
        let mut ws = exec_ws(socket, key, "project", json!({"cmd": ["sleep", "600"]})).await;
        let sid = ws_next(&mut ws).await["session"]
            .as_str()
            .expect("session")
            .to_string();
        bhatti(home, &[], &["kill", "project", &sid], None).ok("bhatti kill");
        let exit = ws_next(&mut ws).await;
        assert_eq!(exit["type"], "exit", "{exit}");
    });
}

/// The product's documented command lines, each run as written (`sudo`
/// dropped: tests run as root; the daemon's config comes from
/// BHATTI_CONFIG so the argv stays verbatim), and the REST examples.
#[test]
fn documented_command_lines() {
    let Some((kernel, rootfs)) = artifacts("documented_command_lines") else {
        return;
    };
    // `sudo bhatti serve`, run from its data dir with no flags.
    let d = Daemon::start_as(&kernel, &rootfs, true);
    let home = d.home();
    let cfg = d.config_arg();
    let host_env = [("BHATTI_CONFIG", cfg.as_str())];
    let argv = |line: &str| -> Vec<String> { line.split(' ').map(str::to_string).collect() };
    let run = |line: &str| {
        let args = argv(line);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bhatti(&home, &[], &args, None).ok(line)
    };

    let r = bhatti(
        &home,
        &host_env,
        &argv("user create --name bob --max-sandboxes 10 --max-cpus 4 --max-memory 4096")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        None,
    )
    .ok("user create");
    let key = r
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("bht_"))
        .unwrap_or_else(|| panic!("no key in {:?}", r.stdout))
        .to_string();

    // `bhatti setup`, the answers on stdin.
    let answers = format!("{}\n{key}\n", d.url());
    let r = bhatti(&home, &[], &["setup"], Some(answers.as_bytes())).ok("setup");
    assert!(r.stderr.contains("API endpoint:"), "{:?}", r.stderr);
    assert!(r.stderr.contains("API key:"), "{:?}", r.stderr);
    assert!(r.stdout.contains("connected to"), "{:?}", r.stdout);

    run("create --name project --cpus 2 --memory 1024");
    let sb = run("inspect project --json").json();
    assert_eq!(
        (sb["cpus"].as_u64(), sb["memory_mb"].as_u64()),
        (Some(2), Some(1024))
    );

    piped_sessions(&d.socket, &key, &home);

    // `bhatti shell project` reattaches the newest detached session.
    let mut first = PtyRun::spawn(&home, &[], &["shell", "project", "--", "sh"]);
    first.type_bytes(b"echo fir''st-$((1+1))\r");
    first.until("first-2");
    first.type_bytes(&[0x1c]);
    let (code, stderr, _) = first.finish();
    assert_eq!(code, 0, "detach: {stderr}");
    // --new starts another even so.
    let r = bhatti(
        &home,
        &[],
        &["shell", "project", "--new"],
        Some(b"echo new-$((2+2))\nexit 6\n"),
    );
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stdout.contains("new-4") && !r.stderr.contains("reattaching"),
        "{}",
        r.stderr
    );
    let mut second = PtyRun::spawn(&home, &[], &["shell", "project"]);
    second.type_bytes(b"echo sec''ond-$((1+2))\r");
    second.until("second-3");
    second.type_bytes(b"exit 3\r");
    let (code, stderr, shown) = second.finish();
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("reattaching"), "{stderr}");
    assert!(
        !shown.contains("first-2"),
        "already-seen output repeated: {shown:?}"
    );

    // Create with the documented flags (names are lower case: x).
    std::fs::write(home.join("local"), b"from the host\n").expect("local file");
    run("create --name x --disk-size 4096 --env A=1,B=2 --file ./local:/guest/path --label k=v");
    let r = bhatti(
        &home,
        &[],
        &["exec", "x", "--", "sh", "-c", "echo $A $B; cat /guest/path"],
        None,
    )
    .ok("exec x");
    assert_eq!(r.stdout, "1 2\nfrom the host\n");
    let sb = run("inspect x --json").json();
    assert_eq!(sb["disk_mb"].as_u64(), Some(4096), "{sb}");
    run("snapshot create x --name cp1");
    let list = run("list --label k=v --json").json();
    let names: Vec<&str> = list["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["x"]);
    run("edit x --name renamed");
    let r = run("exec project -- getent hosts renamed");
    assert!(!r.stdout.is_empty(), "the new name resolves");
    run("destroy renamed -y");
    run("snapshot delete cp1");

    // The REST examples.
    let sock = d.socket.clone();
    let json_h = [("Content-Type", "application/json")];
    let (st, body) = http(
        &sock,
        &key,
        "POST",
        "/sandboxes",
        &json_h,
        br#"{"name":"agent","cpus":2}"#,
    );
    assert!(
        st == 201 || st == 200,
        "{st} {}",
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).expect("json");
    let id = v["id"].as_str().expect("id").to_string();
    let (st, body) = http(
        &sock,
        &key,
        "POST",
        &format!("/sandboxes/{id}/exec"),
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/x-ndjson"),
        ],
        br#"{"cmd":["npm","test"]}"#,
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    let last: Value = String::from_utf8_lossy(&body)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("an NDJSON line");
    // The test rootfs has no npm: the stream ends with its error line (with
    // npm it would be the exit line); the request form is what is tested.
    assert!(
        last["type"] == "exit" || (last["type"] == "error" && last.to_string().contains("npm")),
        "{last}"
    );
    std::fs::write(home.join("app.js"), b"console.log(1)\n").expect("app.js");
    let data = std::fs::read(home.join("app.js")).expect("app.js");
    let (st, body) = http(
        &sock,
        &key,
        "PUT",
        &format!("/sandboxes/{id}/files?path=/app.js"),
        &[],
        &data,
    );
    assert_eq!(st / 100, 2, "{}", String::from_utf8_lossy(&body));
    let log: String = (1..=150).map(|i| format!("log-{i}\n")).collect();
    let (st, _) = http(
        &sock,
        &key,
        "PUT",
        &format!("/sandboxes/{id}/files?path=/app.log"),
        &[],
        log.as_bytes(),
    );
    assert_eq!(st / 100, 2);
    let (st, body) = http(
        &sock,
        &key,
        "GET",
        &format!("/sandboxes/{id}/files?path=/app.log&limit=100"),
        &[],
        b"",
    );
    assert_eq!(st, 200);
    let want: String = (1..=100).map(|i| format!("log-{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&body), want);
    let (st, body) = http(
        &sock,
        &key,
        "GET",
        &format!("/sandboxes/{id}/files?path=/app.js"),
        &[],
        b"",
    );
    assert_eq!((st, body), (200, data));

    run("destroy agent -y");
    run("destroy project -y");
    bhatti(&home, &host_env, &["user", "delete", "bob"], None).ok("user delete");
}

#[test]
fn usage_errors_are_one_line_with_exit_2() {
    let home = tempfile::tempdir().expect("tempdir");
    for args in [
        &["frobnicate"][..],
        &["create", "Has_Caps"],
        &["exec", "dev"],
        &["list", "--bogus"],
        &["file", "write", "dev", "/x", "--mode", "999"],
        &["completion", "nosh"],
        &["create", "x", "--allow", "not-a-network"],
        &["create", "x", "--deny", "1.2.3.4:99999"],
        &["edit", "x", "--rename", "Bad_Name"],
    ] {
        bhatti(home.path(), &[], args, None).fails(&format!("{args:?}"), 2);
    }
    let help = bhatti(home.path(), &[], &["--help"], None).ok("help");
    assert!(help.stdout.contains("exec"));
    let comp = bhatti(home.path(), &[], &["completion", "bash"], None).ok("completion");
    assert!(comp.stdout.contains("bhatti"));
}

#[test]
fn unreachable_daemon_and_missing_key() {
    let home = tempfile::tempdir().expect("tempdir");
    let sock = home.path().join("none.sock");
    let url = format!("unix://{}", sock.display());
    bhatti(home.path(), &[("BHATTI_URL", &url)], &["list"], None).fails("no key", 1);
    let r = bhatti(
        home.path(),
        &[("BHATTI_URL", &url), ("BHATTI_TOKEN", "bht_x")],
        &["list"],
        None,
    )
    .fails("unreachable", 1);
    assert!(r.stderr.contains("cannot reach"), "{}", r.stderr);
    bhatti(
        home.path(),
        &[("BHATTI_URL", &url), ("BHATTI_TOKEN", "bht_x")],
        &["exec", "dev", "--", "true"],
        None,
    )
    .fails("exec unreachable", 255);
    bhatti(home.path(), &[("BHATTI_URL", "ftp://x")], &["list"], None).fails("bad url", 2);
    // setup refuses a malformed key before touching anything.
    bhatti(
        home.path(),
        &[],
        &["setup", "--url", &url, "--token", "nope"],
        None,
    )
    .fails("malformed key", 2);
    assert!(!home.path().join(".config/bhatti/config.toml").exists());
}

/// A stand-in daemon on a unix socket: answers every request with `reply`
/// (status 201, JSON) and hands each request (head and body) to the test.
fn fake_daemon(sock: &Path, reply: Value) -> std::sync::mpsc::Receiver<(String, Vec<u8>)> {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::os::unix::net::UnixListener::bind(sock).expect("bind");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut head = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let text = reply.to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            if tx.send((head, body)).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn create_sends_files_with_their_modes() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().expect("tempdir");
    let sock = home.path().join("fake.sock");
    let reply = json!({"id": "sb-1", "name": "x", "status": "running", "thermal": "hot",
        "cpus": 1, "memory_mb": 512, "keep_hot": false, "labels": {}, "ip": null,
        "created_at": "2026-01-01T00:00:00Z",
        "init": {"state": "failed", "exit_code": 3}});
    let requests = fake_daemon(&sock, reply);
    let url = format!("unix://{}", sock.display());
    let env = [("BHATTI_URL", url.as_str()), ("BHATTI_TOKEN", "bht_x")];
    std::fs::write(home.path().join("run.sh"), b"#!/bin/sh\n").expect("run.sh");
    std::fs::set_permissions(
        home.path().join("run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .expect("chmod");
    std::fs::write(home.path().join("key"), [0u8, 1, 2, 255]).expect("key");

    let r = bhatti(
        home.path(),
        &env,
        &[
            "create",
            "x",
            "--file",
            "./run.sh:/workspace/run.sh",
            "--file",
            "./key:/home/lohar/.ssh/id:600",
            "--init",
            "exit 3",
            "--wait-init",
        ],
        None,
    )
    .ok("create");
    assert!(r.stdout.contains("failed (exit 3)"), "{}", r.stdout);
    let (head, body) = requests
        .recv_timeout(Duration::from_secs(30))
        .expect("a request");
    assert!(head.starts_with("POST /sandboxes "), "{head}");
    let v: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(
        v["files"],
        json!([
            {"path": "/workspace/run.sh", "content": "IyEvYmluL3NoCg==", "mode": 0o750},
            {"path": "/home/lohar/.ssh/id", "content": "AAEC/w==", "mode": 0o600},
        ]),
        "{v}"
    );
    assert_eq!(
        (v["init"].as_str(), v["wait_init"].as_bool()),
        (Some("exit 3"), Some(true))
    );

    // Bad specs fail before anything is sent: exit 2, one line.
    for spec in [
        "./key:relative",
        "./key:/proc/x",
        "./key:/a/../b",
        "./key:/x:9999",
        "./missing:/x",
    ] {
        bhatti(home.path(), &env, &["create", "x", "--file", spec], None)
            .fails(&format!("--file {spec}"), 2);
    }
    assert!(requests.try_recv().is_err(), "a bad --file sent a request");
}
