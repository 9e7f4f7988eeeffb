//! Starting user commands without copying the agent's address space.
//!
//! `std::process::Command` falls back to `fork` as soon as a command needs a
//! `pre_exec` step (a new session, a controlling terminal, another uid),
//! and fork copies the agent's page tables: measured here, +170 µs per
//! command on the host and far more under software emulation. This module
//! does what glibc's `posix_spawn` does internally — `clone(CLONE_VM |
//! CLONE_VFORK)` onto a small separate stack — and then the steps
//! posix_spawn cannot: `setsid`, `TIOCSCTTY`, `setgroups`/`setgid`/`setuid`
//! and `chdir`.
//!
//! The child shares the agent's memory until it calls `execve`, so it runs
//! only raw system calls on data prepared before the clone: no allocation,
//! no locks, and no glibc credential wrappers (glibc's `setuid` would signal
//! the agent's own threads to change credentials too).

use std::ffi::{c_int, c_void, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// One of the child's standard streams.
#[derive(Debug)]
pub enum Io {
    /// `/dev/null`.
    Null,
    /// A new pipe; the agent keeps the other end in [`Child`].
    Piped,
    /// This descriptor (a PTY slave, an output file).
    Fd(OwnedFd),
}

impl Io {
    pub fn null() -> Io {
        Io::Null
    }
    pub fn piped() -> Io {
        Io::Piped
    }
}

impl From<OwnedFd> for Io {
    fn from(fd: OwnedFd) -> Io {
        Io::Fd(fd)
    }
}

impl From<std::fs::File> for Io {
    fn from(f: std::fs::File) -> Io {
        Io::Fd(f.into())
    }
}

/// A command ready to start, built by `user::command`.
#[derive(Debug)]
pub struct Command {
    pub(crate) program: String,
    pub(crate) argv: Vec<CString>,
    pub(crate) env: Vec<CString>,
    pub(crate) cwd: CString,
    /// Switch to this uid/gid (with only that group) before exec.
    pub(crate) creds: Option<(u32, u32)>,
    /// Make fd 0 the controlling terminal of the new session.
    pub(crate) ctty: bool,
    stdio: [Option<Io>; 3],
}

/// A started child. Its exit status comes from the reaper, never from here.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid
    }
}

impl Command {
    pub(crate) fn new(
        program: String,
        argv: Vec<CString>,
        env: Vec<CString>,
        cwd: CString,
    ) -> Self {
        Command {
            program,
            argv,
            env,
            cwd,
            creds: None,
            ctty: false,
            stdio: [None, None, None],
        }
    }

    pub fn stdin(&mut self, io: impl Into<Io>) -> &mut Self {
        self.stdio[0] = Some(io.into());
        self
    }
    pub fn stdout(&mut self, io: impl Into<Io>) -> &mut Self {
        self.stdio[1] = Some(io.into());
        self
    }
    pub fn stderr(&mut self, io: impl Into<Io>) -> &mut Self {
        self.stdio[2] = Some(io.into());
        self
    }

    /// The executable `execve` gets: the program itself when it contains a
    /// slash, else the first match on the command's `PATH` (like execvp).
    fn resolve(&self) -> std::io::Result<CString> {
        let not_found = || std::io::Error::new(std::io::ErrorKind::NotFound, "command not found");
        if self.program.contains('/') {
            return CString::new(self.program.as_bytes()).map_err(|_| not_found());
        }
        let path = self
            .env
            .iter()
            .find_map(|kv| kv.to_bytes().strip_prefix(b"PATH="))
            .unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
        for dir in path.split(|b| *b == b':').filter(|d| !d.is_empty()) {
            let candidate = Path::new(std::ffi::OsStr::from_bytes(dir)).join(&self.program);
            let Ok(meta) = std::fs::metadata(&candidate) else {
                continue;
            };
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return CString::new(candidate.as_os_str().as_bytes()).map_err(|_| not_found());
            }
        }
        Err(not_found())
    }

    /// Starts the child. Callers go through `reaper::spawn`, which holds the
    /// reaper's lock around this so the exit status cannot be lost.
    pub(crate) fn spawn(&mut self) -> std::io::Result<Child> {
        let program = self.resolve()?;
        // Parent ends of pipes, and the fds the child dup2s onto 0, 1, 2.
        let mut ours: [Option<OwnedFd>; 3] = [None, None, None];
        let mut theirs: Vec<OwnedFd> = Vec::with_capacity(3);
        for (i, io) in self.stdio.iter_mut().enumerate() {
            let fd = match io.take().unwrap_or(Io::Null) {
                Io::Null => OwnedFd::from(
                    std::fs::OpenOptions::new()
                        .read(i == 0)
                        .write(i != 0)
                        .open("/dev/null")?,
                ),
                Io::Piped => {
                    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                        .map_err(std::io::Error::from)?;
                    if i == 0 {
                        ours[0] = Some(w);
                        r
                    } else {
                        ours[i] = Some(r);
                        w
                    }
                }
                Io::Fd(fd) => fd,
            };
            theirs.push(fd);
        }
        // dup2 onto 0–2 must not clobber a source that is itself 0–2.
        for fd in theirs.iter_mut() {
            if fd.as_raw_fd() < 3 {
                // try_clone duplicates with F_DUPFD_CLOEXEC at 3 or above.
                *fd = fd.try_clone()?;
            }
        }

        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let mut args = ChildArgs {
            program: program.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            cwd: self.cwd.as_ptr(),
            fds: [
                theirs[0].as_raw_fd(),
                theirs[1].as_raw_fd(),
                theirs[2].as_raw_fd(),
            ],
            creds: self.creds,
            ctty: self.ctty,
            // SAFETY: sigset_t is plain data; zeroed is a valid empty set.
            old_mask: unsafe { std::mem::zeroed() },
            errno: 0,
        };
        // Uninitialised is fine for a stack, and skips a 64 KiB memset.
        let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
        // SAFETY: the stack grows down from its 16-byte aligned top; the
        // buffer outlives the child's use of it because CLONE_VFORK suspends
        // us until the child has called execve or exited.
        let pid = unsafe {
            let top = stack.as_mut_ptr().add(CHILD_STACK);
            let top = (top as usize & !15) as *mut c_void;
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            // No handler of ours may run in the child while it shares our
            // memory: block everything; the child restores the mask itself.
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut args.old_mask);
            let pid = libc::clone(
                child_main,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                &mut args as *mut ChildArgs as *mut c_void,
            );
            let clone_errno = std::io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &args.old_mask, std::ptr::null_mut());
            if pid < 0 {
                return Err(clone_errno);
            }
            pid
        };
        drop(stack);
        drop(theirs);
        if args.errno != 0 {
            // The child failed before execve and has exited: collect it here
            // (the reaper is locked out by our caller) and report why.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            return Err(std::io::Error::from_raw_os_error(args.errno));
        }
        let [stdin, stdout, stderr] = ours;
        Ok(Child {
            pid: pid as u32,
            stdin,
            stdout,
            stderr,
        })
    }
}

const CHILD_STACK: usize = 64 * 1024;

/// Everything the child needs, prepared by the parent.
#[repr(C)]
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    fds: [RawFd; 3],
    creds: Option<(u32, u32)>,
    ctty: bool,
    old_mask: libc::sigset_t,
    /// Set by the child when a step before execve fails.
    errno: c_int,
}

/// Runs in the child, on its own stack, in the parent's memory.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's ChildArgs, alive (the parent is
    // suspended by CLONE_VFORK) and written only by us until execve.
    let a = unsafe { &mut *(arg as *mut ChildArgs) };
    // SAFETY: only raw system calls on pointers prepared by the parent.
    let err = unsafe { child_steps(a) };
    a.errno = err;
    // SAFETY: _exit ends this process without running any of the parent's
    // atexit handlers or touching shared state.
    unsafe { libc::_exit(127) }
}

/// The steps between clone and execve. Returns the errno of the step that
/// failed (execve returns only on failure).
unsafe fn child_steps(a: &ChildArgs) -> c_int {
    // SAFETY: raw system calls and libc wrappers that are async-signal-safe,
    // on pointers the parent prepared and keeps alive (see the module doc).
    unsafe {
        let errno = || *libc::__errno_location();
        // Handlers are the parent's code: reset every caught signal (and
        // SIGPIPE, which Rust ignores) to the default. Without CLONE_SIGHAND
        // this changes only the child's table. lohar installs handlers only
        // for classic signals, so the real-time range needs no look.
        for sig in 1..32 {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            if old.sa_sigaction != libc::SIG_DFL
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if libc::setsid() < 0 {
            return errno();
        }
        for (target, &src) in a.fds.iter().enumerate() {
            if libc::dup2(src, target as c_int) < 0 {
                return errno();
            }
        }
        if a.ctty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
            return errno();
        }
        if let Some((uid, gid)) = a.creds {
            let groups = [gid as libc::gid_t];
            if libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) < 0
                || libc::syscall(libc::SYS_setgid, gid) < 0
                || libc::syscall(libc::SYS_setuid, uid) < 0
            {
                return errno();
            }
        }
        // After dropping privileges, so the user's own access applies.
        if libc::chdir(a.cwd) < 0 {
            return errno();
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &a.old_mask, std::ptr::null_mut());
        libc::execve(a.program, a.argv, a.envp);
        errno()
    }
}
