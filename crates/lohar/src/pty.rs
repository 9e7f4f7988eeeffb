//! PTY exec: new sessions, attach/reattach by offset, list, kill.
//!
//! A session's output task always drains the PTY master into the session's
//! scrollback ring, attached or not, so the process never blocks on a slow
//! or absent client. Each attached channel streams from its own cursor in
//! the ring; a cancel or a lost connection only detaches.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bhatti_protocol::frame::MAX_CHUNK;
use bhatti_protocol::mux::{Channel, ChannelSender, Inbound};
use bhatti_protocol::{
    AttachRequest, Control, ErrorBody, ErrorCode, Event, ExitStatus, Gap, PtyEnd, PtyRequest,
    Sessions,
};
use bytes::{Buf, Bytes};
use nix::errno::Errno;
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::handlers::Reply;
use crate::server::Agent;
use crate::sessions::{Next, Session};
use crate::user;

/// Input bytes buffered for a program that isn't reading its terminal;
/// past this the agent stops reading the channel (the client then stalls
/// on credit).
const MAX_INPUT_QUEUE: usize = 256 * 1024;
/// After the process exits, how long output from processes still holding
/// the terminal (background jobs) is collected before the session ends.
const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(500);

fn internal(what: &str, e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, format!("{what}: {e}"))
}

fn to_json<T: serde::Serialize>(v: &T) -> Reply {
    serde_json::to_value(v).map_err(|e| internal("encoding the reply", e))
}

pub async fn start(agent: &Agent, channel: Channel, req: PtyRequest) -> Reply {
    let argv = match req.argv {
        Some(argv) => argv,
        None => vec![agent.config.shell.clone(), "-l".into()],
    };
    if req.piped {
        if argv.is_empty() {
            return Err(ErrorBody::new(ErrorCode::BadRequest, "argv is empty"));
        }
        let cmd = user::command(
            &agent.config,
            &agent.sandbox_env(),
            &user::Spec {
                argv: &argv,
                env: &req.env,
                cwd: req.cwd.as_deref(),
                stdio: user::Stdio::Pipes,
            },
        )?;
        let session = agent
            .sessions
            .create(|| spawn_piped_session(agent, cmd, argv, None, req.hold))?;
        agent.activity.touch();
        return serve(agent, session, channel, 0, None).await;
    }
    let cmd = user::command(
        &agent.config,
        &agent.sandbox_env(),
        &user::Spec {
            argv: &argv,
            env: &req.env,
            cwd: req.cwd.as_deref(),
            stdio: user::Stdio::Pty,
        },
    )?;
    let session = agent
        .sessions
        .create(|| spawn_session(agent, cmd, argv, req.rows, req.cols))?;
    agent.activity.touch();
    serve(agent, session, channel, 0, None).await
}

/// Opens a PTY, starts the command on it and the task draining its output.
fn spawn_session(
    agent: &Agent,
    mut cmd: crate::spawn::Command,
    argv: Vec<String>,
    rows: u16,
    cols: u16,
) -> Result<Arc<Session>, ErrorBody> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(&size, None).map_err(|e| internal("openpty", e))?;
    // Neither end may leak into other children: a stray copy of the slave
    // would keep the session open after its process exits.
    for fd in [&pty.master, &pty.slave] {
        set_cloexec(fd.as_fd()).map_err(|e| internal("fcntl", e))?;
    }
    let stdio = || -> Result<crate::spawn::Io, ErrorBody> {
        Ok(pty
            .slave
            .try_clone()
            .map_err(|e| internal("dup", e))?
            .into())
    };
    cmd.stdin(stdio()?).stdout(stdio()?).stderr(stdio()?);
    let argv0 = argv.first().map(String::as_str).unwrap_or_default();
    let spawned = crate::reaper::spawn(&mut cmd);
    // The command holds the parent's slave copies: close them now, so the
    // master sees EOF once the session's processes are gone.
    drop(cmd);
    drop(pty.slave);
    let (child, exit_rx) = spawned.map_err(|e| user::spawn_error(argv0, &e))?;
    let pid = child.id();
    drop(child);

    let master = set_nonblocking(pty.master.as_fd())
        .map_err(std::io::Error::from)
        .and_then(|()| {
            // SAFETY: an OwnedFd owns a valid descriptor, which is neither
            // replaced nor closed while the AsyncFd owns it.
            unsafe { AsyncFd::register(pty.master) }.map_err(std::io::Error::from)
        })
        .map_err(|e| {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            internal("pty master", e)
        })?;
    let master = Arc::new(master);
    let session = Arc::new(Session::new(
        crate::server::random_id(),
        pid,
        argv,
        rows,
        cols,
        agent.sessions.scrollback(),
        master.clone(),
    ));
    tokio::spawn(output_task(agent.clone(), session.clone(), master, exit_rx));
    Ok(session)
}

/// Starts the init script as the kept piped session `id`, its stdin at
/// end of input. Returns its pid.
pub fn start_init(agent: &Agent, id: &str, script: String) -> Result<u32, ErrorBody> {
    let argv = vec!["/bin/sh".to_owned(), "-c".to_owned(), script];
    let cmd = user::command(
        &agent.config,
        &agent.sandbox_env(),
        &user::Spec {
            argv: &argv,
            env: &Default::default(),
            cwd: None,
            stdio: user::Stdio::Pipes,
        },
    )?;
    let session = agent
        .sessions
        .create(|| spawn_piped_session(agent, cmd, argv, Some(id), false))?;
    session.close_input();
    Ok(session.pid)
}

/// Starts the command on pipes, and the task draining stdout and stderr.
/// `kept_id`: the session has this id and is kept after it exits.
fn spawn_piped_session(
    agent: &Agent,
    mut cmd: crate::spawn::Command,
    argv: Vec<String>,
    kept_id: Option<&str>,
    hold: bool,
) -> Result<Arc<Session>, ErrorBody> {
    use crate::spawn::Io;
    use tokio::net::unix::pipe;
    cmd.stdin(Io::piped())
        .stdout(Io::piped())
        .stderr(Io::piped());
    let argv0 = argv.first().map(String::as_str).unwrap_or_default();
    let (mut child, exit_rx) =
        crate::reaper::spawn(&mut cmd).map_err(|e| user::spawn_error(argv0, &e))?;
    drop(cmd);
    let pid = child.id();
    let fail = |what: &str, e: std::io::Error| {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        internal(what, e)
    };
    let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
    let stdout = child
        .stdout
        .take()
        .ok_or_else(missing)
        .and_then(pipe::Receiver::from_owned_fd)
        .map_err(|e| fail("stdout pipe", e))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(missing)
        .and_then(pipe::Receiver::from_owned_fd)
        .map_err(|e| fail("stderr pipe", e))?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(missing)
        .and_then(|fd| {
            set_nonblocking(fd.as_fd()).map_err(std::io::Error::from)?;
            // SAFETY: as for the PTY master: the AsyncFd owns the fd.
            unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)
        })
        .map_err(|e| fail("stdin pipe", e))?;
    drop(child);
    let session = Arc::new(
        Session::new(
            kept_id.map_or_else(crate::server::random_id, str::to_owned),
            pid,
            argv,
            0,
            0,
            agent.sessions.scrollback(),
            Arc::new(stdin),
        )
        .with_piped(true)
        .with_kept(kept_id.is_some())
        .with_hold(hold),
    );
    tokio::spawn(piped_output_task(
        agent.clone(),
        session.clone(),
        stdout,
        stderr,
        exit_rx,
    ));
    Ok(session)
}

/// A piped session's [`output_task`]: drains stdout and stderr into the
/// ring until both close (or the process exited and the drain grace
/// passed), then records the exit.
async fn piped_output_task(
    agent: Agent,
    session: Arc<Session>,
    stdout: tokio::net::unix::pipe::Receiver,
    stderr: tokio::net::unix::pipe::Receiver,
    mut exit_rx: oneshot::Receiver<WaitStatus>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut status: Option<ExitStatus> = None;
    let mut grace: Option<tokio::time::Instant> = None;
    let mut open = [true, true];
    let pipes = [&stdout, &stderr];
    while open[0] || open[1] {
        // A lagging attachment holds the output (until the exit grace).
        let held = grace.is_none() && session.held();
        tokio::select! {
            _ = session.moved(), if held => {}
            r = pipes[0].readable(), if open[0] && !held => {
                if r.is_err() { open[0] = false; continue; }
                open[0] = read_pipe(&agent, &session, pipes[0], &mut buf, false);
            }
            r = pipes[1].readable(), if open[1] && !held => {
                if r.is_err() { open[1] = false; continue; }
                open[1] = read_pipe(&agent, &session, pipes[1], &mut buf, true);
            }
            st = &mut exit_rx, if status.is_none() => {
                status = Some(wait_to_exit(st.ok()));
                grace = Some(tokio::time::Instant::now() + EXIT_DRAIN_GRACE);
            }
            _ = sleep_until_opt(grace), if grace.is_some() => {
                // Background processes hold the pipes: take what is buffered.
                for (i, p) in pipes.iter().enumerate().filter(|(i, _)| open[*i]) {
                    while let Ok(n @ 1..) = p.try_read(&mut buf) {
                        session.push_stream(&buf[..n], i == 1);
                    }
                }
                break;
            }
        }
    }
    drop((stdout, stderr));
    session.close_input();
    let status = match status {
        Some(s) => s,
        None => wait_to_exit((&mut exit_rx).await.ok()),
    };
    session.finish(status);
    agent.activity.touch();
    if session.kept {
        return;
    }
    tokio::time::sleep(agent.sessions.limits().exited_session_grace).await;
    agent.sessions.remove(&session.id);
}

/// Reads what one pipe has into the ring; false once it is closed.
fn read_pipe(
    agent: &Agent,
    session: &Session,
    pipe: &tokio::net::unix::pipe::Receiver,
    buf: &mut [u8],
    stderr: bool,
) -> bool {
    match pipe.try_read(buf) {
        Ok(0) => false,
        Ok(n) => {
            session.push_stream(&buf[..n], stderr);
            agent.activity.touch();
            true
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            true
        }
        Err(_) => false,
    }
}

fn set_cloexec(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
}

fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// Drains the master into the ring until the terminal closes (or the
/// process has exited and the drain grace passed), records the exit, and
/// removes the session after the exited-session grace.
async fn output_task(
    agent: Agent,
    session: Arc<Session>,
    master: Arc<AsyncFd<OwnedFd>>,
    mut exit_rx: oneshot::Receiver<WaitStatus>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut status: Option<ExitStatus> = None;
    let mut grace: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            r = master.readable() => {
                let Ok(mut guard) = r else { break };
                match guard.try_io(|fd| read_fd(fd, &mut buf)) {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => {
                        session.push_output(&buf[..n]);
                        agent.activity.touch();
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // EIO: every copy of the slave is closed.
                    Ok(Err(_)) => break,
                    Err(_would_block) => {}
                }
            }
            st = &mut exit_rx, if status.is_none() => {
                status = Some(wait_to_exit(st.ok()));
                grace = Some(tokio::time::Instant::now() + EXIT_DRAIN_GRACE);
            }
            _ = sleep_until_opt(grace), if grace.is_some() => {
                // Background jobs hold the terminal: take what is buffered.
                while let Ok(n) = read_fd(&master, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    session.push_output(&buf[..n]);
                }
                break;
            }
        }
    }
    drop(master);
    let status = match status {
        Some(s) => s,
        // The terminal closed but the process may still run (it closed its
        // tty); the session ends when it exits.
        None => wait_to_exit((&mut exit_rx).await.ok()),
    };
    session.finish(status);
    agent.activity.touch();
    tokio::time::sleep(agent.sessions.limits().exited_session_grace).await;
    agent.sessions.remove(&session.id);
}

fn wait_to_exit(st: Option<WaitStatus>) -> ExitStatus {
    match st {
        Some(st) => crate::reaper::exit_status(st, false),
        None => ExitStatus::default(),
    }
}

fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    nix::unistd::read(fd.get_ref(), buf).map_err(std::io::Error::from)
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub async fn attach(agent: &Agent, channel: Channel, req: AttachRequest) -> Reply {
    let Some(session) = agent.sessions.get(&req.session) else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("no session {}", req.session),
        ));
    };
    let (cursor, gap) = session.resolve_offset(req.offset)?;
    serve(agent, session, channel, cursor, gap).await
}

/// One attached channel: output from `cursor` on, input and control in.
async fn serve(
    agent: &Agent,
    session: Arc<Session>,
    channel: Channel,
    mut cursor: u64,
    gap: Option<Gap>,
) -> Reply {
    let attached = session.attach(cursor);
    let Channel {
        sender,
        mut receiver,
    } = channel;
    event(
        &sender,
        &Event::Attached {
            session: session.id.clone(),
            pid: session.pid,
            offset: cursor,
            gap,
        },
    );
    let mut updates = session.subscribe();
    let mut pending: Option<(Bytes, bool)> = None;
    let mut input: VecDeque<Bytes> = VecDeque::new();
    let mut queued = 0usize;
    loop {
        if pending.is_none() {
            let _ = updates.borrow_and_update();
            match session.next(cursor, MAX_CHUNK) {
                Next::Output(b, stderr) => pending = Some((b, stderr)),
                Next::Gap(g) => {
                    // Fell behind the ring: say so, never skip silently.
                    event(
                        &sender,
                        &Event::Gap {
                            from: g.from,
                            to: g.to,
                        },
                    );
                    cursor = g.to;
                    session.set_cursor(attached.id, cursor);
                    continue;
                }
                Next::CaughtUp(Some(status)) => {
                    return to_json(&PtyEnd::Exited {
                        status,
                        offset: cursor,
                    })
                }
                Next::CaughtUp(None) => {}
            }
        }
        let master = session.master();
        tokio::select! {
            // One chunk of at most MAX_CHUNK is one frame: if this future is
            // dropped while waiting for credit, nothing was sent.
            r = send_opt(&sender, pending.clone()) => match r {
                Ok(n) => {
                    cursor += n as u64;
                    session.set_cursor(attached.id, cursor);
                    pending = None;
                }
                // The connection is gone: a silent detach.
                Err(_) => return to_json(&PtyEnd::Detached { offset: cursor }),
            },
            r = updates.changed(), if pending.is_none() => {
                if r.is_err() {
                    // Unreachable while we hold the session; don't spin.
                    return Err(internal("session", "update channel closed"));
                }
            }
            w = writable_opt(master.as_deref()), if !input.is_empty() => {
                match w.and_then(|mut g| match g.try_io(|fd| write_front(fd, &mut input)) {
                    Ok(r) => r,
                    Err(_would_block) => Ok(0),
                }) {
                    Ok(n) => queued -= n,
                    Err(_) => {
                        input.clear();
                        queued = 0;
                    }
                }
            }
            msg = receiver.recv(), if queued < MAX_INPUT_QUEUE => match msg {
                Some(Inbound::Data(b)) => {
                    agent.activity.touch();
                    if session.exit().is_none() && !b.is_empty() {
                        queued += b.len();
                        input.push_back(b);
                    }
                }
                Some(Inbound::Control(body)) => control(&sender, &session, &body),
                Some(Inbound::Eof) if session.piped => {
                    // End of the piped command's stdin, after what came before.
                    flush_input(master.as_deref(), &mut input).await;
                    input.clear();
                    queued = 0;
                    session.close_input();
                }
                Some(Inbound::Close(_)) | None => {
                    // Input sent before the detach still belongs to the
                    // session: deliver it before letting go.
                    flush_input(master.as_deref(), &mut input).await;
                    return to_json(&PtyEnd::Detached { offset: cursor });
                }
                Some(_) => {}
            }
        }
    }
}

fn event(sender: &ChannelSender, ev: &Event) {
    if let Ok(body) = serde_json::to_vec(ev) {
        let _ = sender.event(Bytes::from(body));
    }
}

async fn send_opt(
    sender: &ChannelSender,
    chunk: Option<(Bytes, bool)>,
) -> Result<usize, bhatti_protocol::mux::MuxError> {
    match chunk {
        Some((b, stderr)) => {
            let n = b.len();
            if stderr {
                sender.stderr(b).await.map(|()| n)
            } else {
                sender.data(b).await.map(|()| n)
            }
        }
        None => std::future::pending().await,
    }
}

async fn writable_opt(
    master: Option<&AsyncFd<OwnedFd>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
    match master {
        Some(m) => m.writable().await,
        None => Err(std::io::ErrorKind::BrokenPipe.into()),
    }
}

/// Writes what is left of `input` to the terminal, for at most a second
/// (a program that never reads its terminal must not hold up a detach).
async fn flush_input(master: Option<&AsyncFd<OwnedFd>>, input: &mut VecDeque<Bytes>) {
    let Some(master) = master else { return };
    let flush = async {
        while !input.is_empty() {
            let Ok(mut guard) = master.writable().await else {
                return;
            };
            match guard.try_io(|fd| write_front(fd, input)) {
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => return,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flush).await;
}

fn write_front(fd: &AsyncFd<OwnedFd>, input: &mut VecDeque<Bytes>) -> std::io::Result<usize> {
    let Some(front) = input.front_mut() else {
        return Ok(0);
    };
    let n = nix::unistd::write(fd.get_ref(), &front[..]).map_err(std::io::Error::from)?;
    front.advance(n);
    if front.is_empty() {
        input.pop_front();
    }
    Ok(n)
}

fn control(sender: &ChannelSender, session: &Session, body: &[u8]) {
    match serde_json::from_slice::<Control>(body) {
        Ok(Control::Resize { .. }) if session.piped => {}
        Ok(Control::Resize { rows, cols }) => {
            if let Some(master) = session.master() {
                let ws = libc::winsize {
                    ws_row: rows,
                    ws_col: cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer;
                // the fd is open for as long as `master` lives.
                let rc =
                    unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                if rc < 0 {
                    let e = std::io::Error::last_os_error();
                    let _ = sender.error(ErrorCode::Io, format!("resize: {e}"));
                    return;
                }
            }
            session.set_size(rows, cols);
        }
        Ok(Control::Signal { signal }) => match Signal::try_from(signal) {
            Ok(sig) => {
                if session.exit().is_none() {
                    let _ = killpg(Pid::from_raw(session.pid as i32), sig);
                }
            }
            Err(_) => {
                let _ = sender.error(ErrorCode::BadRequest, format!("invalid signal {signal}"));
            }
        },
        Err(e) => {
            let _ = sender.error(ErrorCode::BadRequest, format!("malformed control: {e}"));
        }
    }
}

pub fn list(agent: &Agent) -> Reply {
    to_json(&Sessions {
        sessions: agent.sessions.list(),
    })
}

/// Signals a session's process group (SIGKILL by default). Killing a
/// session that already exited is a no-op.
pub fn kill(agent: &Agent, id: &str, signal: Option<i32>) -> Reply {
    let Some(session) = agent.sessions.get(id) else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("no session {id}"),
        ));
    };
    let sig = match signal {
        None => Signal::SIGKILL,
        Some(n) => Signal::try_from(n)
            .map_err(|_| ErrorBody::new(ErrorCode::BadRequest, format!("invalid signal {n}")))?,
    };
    if session.exit().is_none() {
        match killpg(Pid::from_raw(session.pid as i32), sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => return Err(internal("kill", e)),
        }
    }
    Ok(serde_json::json!({}))
}
