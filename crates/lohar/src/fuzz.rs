//! Target `requests`: `Open` bodies (and `Control` bodies) from a hostile
//! or broken client through the agent's real parsing and validation —
//! `parse_request`, then per op the checks its handler runs first — without
//! starting processes or touching anything outside a scratch directory.
//!
//! - exec / pty: `user::command` (argv, env, cwd checks; nothing spawned);
//! - write / remove: `files::write_target` / `files::remove_target`;
//! - read: both read paths (inline `produce`, streamed `locate`) on fixture
//!   files, asserted to agree on the window's bytes and truncation;
//! - stat / list: the real handlers, on paths re-rooted in the scratch dir;
//! - kill / attach / sessions / activity / reidentify: the real handlers
//!   (reidentify outside PID 1 only replaces the token and env).
//!
//! Asserted: no panic, and no allocation beyond a bound.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use bhatti_protocol::fuzz::gen::{self, Rng};
use bhatti_protocol::fuzz::Target;
use bhatti_protocol::{Control, ReadFileRequest, Request};
use serde_json::Value;

use crate::config::AgentConfig;
use crate::server::{Agent, AgentState};
use crate::{files, handlers, pty, user};

/// Fixture paths (under the scratch dir) requests are pointed at.
const FIXTURES: &[&str] = &[
    "/f", "/big", "/empty", "/nl", "/d", "/d/a", "/nope", "/f/x", "/", "/d/../f",
];

pub struct Requests {
    agent: Agent,
    root: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Requests {
    /// Makes a scratch dir with fixture files under `std::env::temp_dir()`.
    pub fn new() -> std::io::Result<Requests> {
        let root = std::env::temp_dir().join(format!(
            "lohar-fuzz-{}-{}",
            std::process::id(),
            crate::server::random_id()
        ));
        std::fs::create_dir_all(root.join("d"))?;
        let mut f = File::create(root.join("f"))?;
        for i in 0..50 {
            writeln!(f, "line {i}")?;
        }
        write!(f, "no newline at the end")?;
        let mut big = File::create(root.join("big"))?;
        for i in 0..20_000 {
            writeln!(big, "a longer line number {i}")?;
        }
        File::create(root.join("empty"))?;
        std::fs::write(root.join("nl"), "\n\n\n")?;
        std::fs::write(root.join("d/a"), "a")?;
        let mut config = AgentConfig::guest_default("fuzz-token".into());
        config.uid = nix::unistd::geteuid().as_raw();
        config.gid = nix::unistd::getegid().as_raw();
        config.home = root.display().to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Requests {
            agent: AgentState::new(config),
            root,
            rt,
        })
    }

    /// `path` moved under the scratch dir, unless it is not absolute or
    /// could leave it (`..`).
    fn reroot(&self, path: &str) -> Option<String> {
        let p = Path::new(path);
        let inside = path.starts_with('/')
            && path.len() < 4096
            && !p.components().any(|c| c == Component::ParentDir);
        inside.then(|| format!("{}{}", self.root.display(), path))
    }

    fn read(&self, req: &ReadFileRequest) {
        if files::abs_path(&req.path).is_err() {
            return;
        }
        let Some(path) = self.reroot(&req.path).map(PathBuf::from) else {
            return;
        };
        let Ok((file, md)) = files::open_regular(&path) else {
            return;
        };
        let size = md.len();
        let window = files::LineWindow::new(req);
        let inline = files::produce(file.take(size), &path, window);
        let Ok((mut file, _)) = files::open_regular(&path) else {
            return;
        };
        let streamed = files::locate(&mut file, &path, window, size, || false);
        if let (Ok((chunks, summary)), Ok(extent)) = (inline, streamed) {
            let sent: u64 = chunks.iter().map(|c| c.len() as u64).sum();
            assert_eq!(sent, summary.bytes, "inline read: bytes counted");
            assert_eq!(
                (summary.bytes, summary.truncated),
                (extent.len, extent.truncated),
                "inline and streamed reads differ for {req:?}"
            );
            // Compared piece by piece: a copy of the whole would itself
            // trip the allocation bound.
            let mut streamed = file.take(extent.len);
            for chunk in &chunks {
                let mut piece = vec![0u8; chunk.len()];
                streamed.read_exact(&mut piece).expect("read");
                assert_eq!(&piece[..], &chunk[..], "inline and streamed bytes differ");
            }
        }
    }

    fn command(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        cwd: Option<&str>,
        pty: bool,
    ) {
        let cwd = cwd.and_then(|c| self.reroot(c).or(Some(c.to_owned())));
        let _ = user::command(
            &self.agent.config,
            &self.agent.sandbox_env(),
            &user::Spec {
                argv,
                env,
                cwd: cwd.as_deref(),
                stdio: if pty {
                    user::Stdio::Pty
                } else {
                    user::Stdio::Pipes
                },
            },
        );
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `Control` bodies are tagged by a leading 0x01 byte.
const CONTROL: u8 = 1;

impl Target for Requests {
    fn name(&self) -> &'static str {
        "requests"
    }

    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        let body = if rng.one_in(10) {
            out.push(CONTROL);
            gen::control(rng)
        } else {
            let mut v = gen::request(rng);
            if let Value::Object(m) = &mut v {
                if m.contains_key("path") && rng.one_in(2) {
                    m.insert("path".into(), Value::from(*rng.pick(FIXTURES)));
                }
            }
            v
        };
        out.extend(serde_json::to_vec(&body).unwrap_or_default());
        if rng.one_in(4) {
            gen::mutate(rng, &mut out);
        }
        out
    }

    fn run(&mut self, input: &[u8]) {
        if let Some(body) = input.strip_prefix(&[CONTROL]) {
            if let Ok(Control::Signal { signal }) = serde_json::from_slice::<Control>(body) {
                let _ = nix::sys::signal::Signal::try_from(signal);
            }
            return;
        }
        let Ok(req) = handlers::parse_request(input) else {
            return;
        };
        let agent = &self.agent;
        match req {
            Request::Exec(r) => self.command(&r.argv, &r.env, r.cwd.as_deref(), false),
            Request::Pty(r) => {
                let argv = r.argv.unwrap_or_else(|| vec![agent.config.shell.clone()]);
                self.command(&argv, &r.env, r.cwd.as_deref(), !r.piped);
            }
            Request::Attach(r) => {
                let _ = agent.sessions.get(&r.session);
            }
            Request::Sessions => {
                let _ = pty::list(agent);
            }
            Request::KillSession { id, signal } => {
                let _ = pty::kill(agent, &id, signal);
            }
            Request::ReadFile(r) => self.read(&r),
            Request::WriteFile(r) => {
                let _ = files::write_target(agent, &r);
            }
            Request::Stat { path } => {
                if let Some(p) = self.reroot(&path) {
                    let _ = self.rt.block_on(files::stat(agent, &p));
                } else {
                    let _ = files::abs_path(&path);
                }
            }
            Request::List { path, limit } => {
                if let Some(p) = self.reroot(&path) {
                    let _ = self.rt.block_on(files::list(agent, &p, limit));
                } else {
                    let _ = files::abs_path(&path);
                }
            }
            Request::Mkdir { path } => {
                let _ = files::abs_path(&path);
            }
            Request::Remove { path, .. } => {
                let _ = files::remove_target(&path);
            }
            Request::Activity => {
                let _ = agent.activity.snapshot(agent);
            }
            Request::Reidentify(r) => {
                let _ = self.rt.block_on(crate::identity::reidentify(agent, r));
            }
            // Nothing to check before they act (ports reads /proc, the
            // rest power off or sync the guest).
            Request::Ping
            | Request::Forward { .. }
            | Request::Ports
            | Request::Sync
            | Request::Shutdown => {}
        }
    }

    fn alloc_limit(&self, input: &[u8]) -> usize {
        // A read buffer (64 KiB), plus copies of the input.
        8 * input.len() + 256 * 1024
    }
}
