//! Piped exec: argv, env, cwd, streamed stdin, stdout/stderr kept apart,
//! exit status, timeout, process-group kill on cancel/disconnect, detach.
//!
//! Every command runs in its own session (so its own process group, with
//! pgid = pid): signals, the timeout, a cancel and a dropped connection all
//! act on the whole group, so grandchildren go too. Output flows through the
//! channel's flow control: a client that doesn't read stalls only this
//! command's pipes.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::future::Future;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use bhatti_protocol::frame::MAX_CHUNK;
use bhatti_protocol::mux::{Channel, ChannelSender, Inbound};
use bhatti_protocol::{Control, Detached, ErrorBody, ErrorCode, Event, ExecRequest};
use bytes::{Bytes, BytesMut};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::handlers::Reply;
use crate::server::Agent;
use crate::spawn::Io;
use crate::user;

/// Stdin bytes buffered for a child that isn't reading. Past this the agent
/// stops reading the channel, which in turn stalls the client by credit.
const MAX_STDIN_QUEUE: usize = 1024 * 1024;
/// After the command exits, how long output from processes that inherited
/// its pipes (background jobs) is still forwarded before the reply.
const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(500);

pub async fn run(agent: &Agent, channel: Channel, req: ExecRequest) -> Reply {
    if req.detach {
        return detached(agent, &req);
    }
    let mut cmd = user::command(
        &agent.config,
        &agent.sandbox_env(),
        &user::Spec {
            argv: &req.argv,
            env: &req.env,
            cwd: req.cwd.as_deref(),
            stdio: user::Stdio::Pipes,
        },
    )?;
    cmd.stdin(if req.stdin { Io::piped() } else { Io::null() })
        .stdout(Io::piped())
        .stderr(Io::piped());
    let argv0 = req.argv.first().map(String::as_str).unwrap_or_default();
    let (mut child, mut exit_rx) =
        crate::reaper::spawn(&mut cmd).map_err(|e| user::spawn_error(argv0, &e))?;
    let pid = child.id();
    let group = Pid::from_raw(pid as i32);
    let _running = agent.activity.exec_guard();

    let internal = |what: &str, e: std::io::Error| {
        let _ = killpg(group, Signal::SIGKILL);
        ErrorBody::new(ErrorCode::Internal, format!("{what}: {e}"))
    };
    let stdout = child
        .stdout
        .take()
        .map(pipe::Receiver::from_owned_fd)
        .transpose()
        .map_err(|e| internal("stdout pipe", e))?;
    let stderr = child
        .stderr
        .take()
        .map(pipe::Receiver::from_owned_fd)
        .transpose()
        .map_err(|e| internal("stderr pipe", e))?;
    let mut stdin = child
        .stdin
        .take()
        .map(pipe::Sender::from_owned_fd)
        .transpose()
        .map_err(|e| internal("stdin pipe", e))?;
    // `child` is never waited on: the reaper owns exit statuses.
    drop(child);

    let Channel {
        sender,
        mut receiver,
    } = channel;
    if !req.no_started_event {
        if let Ok(ev) = serde_json::to_vec(&Event::Started { pid }) {
            let _ = sender.event(Bytes::from(ev));
        }
    }
    let (finish_tx, finish_rx) = watch::channel(false);
    let pumps: Vec<JoinHandle<()>> = [(stdout, false), (stderr, true)]
        .into_iter()
        .filter_map(|(p, is_err)| p.map(|p| (p, is_err)))
        .map(|(p, is_err)| {
            tokio::spawn(pump(
                p,
                sender.clone(),
                is_err,
                finish_rx.clone(),
                agent.clone(),
            ))
        })
        .collect();

    let deadline = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut channel_open = true;
    let mut queue: VecDeque<Bytes> = VecDeque::new();
    let mut queued = 0usize;
    let mut stdin_eof = false;

    let status = loop {
        if stdin_eof && queue.is_empty() {
            // Closing our end is the child's EOF.
            stdin = None;
        }
        tokio::select! {
            st = &mut exit_rx => break st,
            _ = sleep_until_opt(deadline), if !timed_out => {
                // Timeout: exit_code is 128+9 = 137 with timed_out: true (not
                // 124 as coreutils' timeout): the group really died of SIGKILL.
                timed_out = true;
                let _ = killpg(group, Signal::SIGKILL);
            }
            w = writable(stdin.as_ref()), if !queue.is_empty() => {
                match w.and_then(|()| write_some(stdin.as_ref(), &mut queue)) {
                    Ok(n) => queued -= n,
                    // EPIPE: the child closed its stdin; drop what's left.
                    Err(_) => { stdin = None; queue.clear(); queued = 0; }
                }
            }
            msg = receiver.recv(), if channel_open && queued < MAX_STDIN_QUEUE => match msg {
                Some(Inbound::Data(b)) => {
                    agent.activity.touch();
                    if stdin.is_some() && !b.is_empty() {
                        queued += b.len();
                        queue.push_back(b);
                    }
                }
                Some(Inbound::Eof) => stdin_eof = true,
                Some(Inbound::Control(body)) => control(&sender, group, &body),
                // The client cancels (Close) or is gone (None): the group dies.
                Some(Inbound::Close(_)) => {
                    let _ = killpg(group, Signal::SIGKILL);
                }
                None => {
                    channel_open = false;
                    let _ = killpg(group, Signal::SIGKILL);
                }
                Some(_) => {}
            }
        }
    };
    drop(stdin);
    let status = match status {
        Ok(s) => s,
        Err(_) => {
            return Err(ErrorBody::new(
                ErrorCode::Internal,
                "the exit status was lost",
            ))
        }
    };

    // The leader is gone; everything it wrote is in the pipes. Wait for EOF,
    // but not forever: a background job may hold the pipes open.
    let mut pumps = pumps;
    let grace = tokio::time::sleep(EXIT_DRAIN_GRACE);
    tokio::pin!(grace);
    loop {
        pumps.retain(|h| !h.is_finished());
        if pumps.is_empty() {
            break;
        }
        tokio::select! {
            _ = &mut grace => break,
            _ = futures_first(&mut pumps) => {}
        }
    }
    let _ = finish_tx.send(true);
    for h in pumps {
        let _ = h.await;
    }
    let status = crate::reaper::exit_status(status, timed_out);
    serde_json::to_value(status).map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))
}

/// Waits until any of the pump tasks ends (or forever if none).
async fn futures_first(pumps: &mut [JoinHandle<()>]) {
    std::future::poll_fn(|cx| {
        for h in pumps.iter_mut() {
            if std::pin::Pin::new(h).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn writable(stdin: Option<&pipe::Sender>) -> std::io::Result<()> {
    match stdin {
        Some(s) => s.writable().await,
        None => Err(std::io::ErrorKind::BrokenPipe.into()),
    }
}

/// Writes what the pipe takes now from the front of the queue.
fn write_some(stdin: Option<&pipe::Sender>, queue: &mut VecDeque<Bytes>) -> std::io::Result<usize> {
    let Some(s) = stdin else {
        return Err(std::io::ErrorKind::BrokenPipe.into());
    };
    let Some(front) = queue.front_mut() else {
        return Ok(0);
    };
    match s.try_write(front) {
        Ok(n) => {
            bytes::Buf::advance(front, n);
            if front.is_empty() {
                queue.pop_front();
            }
            Ok(n)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// A `Control` frame on an exec channel: signals go to the whole group.
fn control(sender: &ChannelSender, group: Pid, body: &[u8]) {
    match serde_json::from_slice::<Control>(body) {
        Ok(Control::Signal { signal }) => match Signal::try_from(signal) {
            Ok(sig) => {
                let _ = killpg(group, sig);
            }
            Err(_) => {
                let _ = sender.error(ErrorCode::BadRequest, format!("invalid signal {signal}"));
            }
        },
        Ok(Control::Resize { .. }) => {
            let _ = sender.error(ErrorCode::BadRequest, "resize needs a PTY exec");
        }
        Err(e) => {
            let _ = sender.error(ErrorCode::BadRequest, format!("malformed control: {e}"));
        }
    }
}

/// Forwards one output pipe to the channel until EOF. Once `finish` is set
/// it forwards only what is already buffered in the pipe, then stops.
async fn pump(
    pipe: pipe::Receiver,
    sender: ChannelSender,
    is_stderr: bool,
    mut finish: watch::Receiver<bool>,
    agent: Agent,
) {
    let mut buf = BytesMut::new();
    // After a send fails (client gone) keep reading, so the command never
    // blocks on a full pipe before it is killed.
    let mut dead = false;
    let mut finishing = false;
    loop {
        if !finishing {
            tokio::select! {
                r = pipe.readable() => if r.is_err() { return },
                _ = finish.wait_for(|f| *f) => finishing = true,
            }
        }
        buf.reserve(MAX_CHUNK);
        match pipe.try_read_buf(&mut buf) {
            Ok(0) => return,
            Ok(_) => {
                agent.activity.touch();
                let chunk = buf.split().freeze();
                if !dead {
                    let sent = if is_stderr {
                        sender.stderr(chunk).await
                    } else {
                        sender.data(chunk).await
                    };
                    dead = sent.is_err();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if finishing {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// `detach: true`: start, answer at once, let it run past the connection.
fn detached(agent: &Agent, req: &ExecRequest) -> Reply {
    let output_file = req
        .output_file
        .clone()
        .unwrap_or_else(|| "/dev/null".into());
    let out = open_output(agent, &output_file)?;
    let err = out
        .try_clone()
        .map_err(|e| crate::handlers::io_error("output file", &e))?;
    let mut cmd = user::command(
        &agent.config,
        &agent.sandbox_env(),
        &user::Spec {
            argv: &req.argv,
            env: &req.env,
            cwd: req.cwd.as_deref(),
            stdio: user::Stdio::Pipes,
        },
    )?;
    cmd.stdin(Io::null()).stdout(out).stderr(err);
    let argv0 = req.argv.first().map(String::as_str).unwrap_or_default();
    // The status receiver is dropped: the reaper discards the status.
    let (child, _) = crate::reaper::spawn(&mut cmd).map_err(|e| user::spawn_error(argv0, &e))?;
    agent.activity.touch();
    serde_json::to_value(Detached {
        pid: child.id(),
        output_file,
    })
    .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))
}

/// Opens `path` for appending; a file it creates belongs to the user.
fn open_output(agent: &Agent, path: &str) -> Result<std::fs::File, ErrorBody> {
    let ctx = format!("output file {path}");
    let mut opts = OpenOptions::new();
    opts.append(true).mode(0o644).custom_flags(libc::O_NOCTTY);
    match opts.clone().create_new(true).open(path) {
        Ok(f) => {
            let uid = nix::unistd::Uid::from_raw(agent.config.uid);
            let gid = nix::unistd::Gid::from_raw(agent.config.gid);
            if nix::unistd::geteuid() != uid {
                nix::unistd::fchown(&f, Some(uid), Some(gid))
                    .map_err(|e| crate::handlers::io_error(&ctx, &e.into()))?;
            }
            Ok(f)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => opts
            .open(path)
            .map_err(|e| crate::handlers::io_error(&ctx, &e)),
        Err(e) => Err(crate::handlers::io_error(&ctx, &e)),
    }
}
