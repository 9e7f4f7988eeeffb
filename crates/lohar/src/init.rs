//! PID 1 duties: mounts, the config drive, hostname, network, signals,
//! poweroff — then the agent itself.
//!
//! PID 1 must never exit (the kernel panics), so every path that cannot go
//! on prints why to the console and powers the machine off instead. Only
//! mounting /proc and /sys and reading the config (no token, no agent) are
//! fatal; everything else is logged and boot continues.
//!
//! Kernel command line:
//! - `bhatti.config=<dev>`: the config drive (default `/dev/vdb`);
//! - `bhatti.agent=vsock:<port>|serial:<name>`: overrides the drive's
//!   transport;
//! - `bhatti.debug`: debug logging;
//! - `bhatti.halt=reboot`: end with reboot(2) `RB_AUTOBOOT` instead of
//!   `RB_POWER_OFF`, for VMMs that exit on a guest reboot (Firecracker,
//!   QEMU `-no-reboot`) but cannot power off.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bhatti_protocol::guest_config::{
    AgentTransport, GuestConfig, NetworkConfig, CONFIG_FILE, INIT_SESSION,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::config::AgentConfig;
use crate::handlers::Reply;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const CONFIG_MOUNT: &str = "/run/bhatti-config";
const DEFAULT_CONFIG_DEV: &str = "/dev/vdb";
/// A config bigger than this is a host bug, not something to load.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// `bhatti.halt=reboot` was given.
static HALT_BY_REBOOT: AtomicBool = AtomicBool::new(false);

/// What the kernel command line says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Cmdline {
    config_dev: Option<String>,
    agent: Option<AgentTransport>,
    debug: bool,
    halt_by_reboot: bool,
}

fn parse_cmdline(s: &str) -> Cmdline {
    let mut c = Cmdline::default();
    for arg in s.split_whitespace() {
        match arg.split_once('=') {
            Some(("bhatti.config", dev)) if dev.starts_with("/dev/") => {
                c.config_dev = Some(dev.to_owned())
            }
            Some(("bhatti.agent", t)) => match AgentTransport::parse_cmdline(t) {
                Some(t) => c.agent = Some(t),
                None => eprintln!("lohar: ignoring bhatti.agent={t}"),
            },
            Some(("bhatti.halt", "reboot")) => c.halt_by_reboot = true,
            None if arg == "bhatti.debug" => c.debug = true,
            _ => {}
        }
    }
    c
}

pub fn run_pid1() -> ! {
    // Before any thread exists: set_var is only sound single-threaded.
    std::env::set_var("PATH", PATH);
    if let Err(e) = mount_early() {
        fatal(e);
    }
    let cmdline = parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if cmdline.debug {
        std::env::set_var("LOHAR_LOG", "debug");
    }
    HALT_BY_REBOOT.store(cmdline.halt_by_reboot, Ordering::SeqCst);
    init_logging(false);
    tracing::info!("lohar {} starting as PID 1", env!("CARGO_PKG_VERSION"));
    match boot(cmdline) {
        Ok(()) => fatal(anyhow::anyhow!("the agent stopped")),
        Err(e) => fatal(e),
    }
}

fn fatal(e: anyhow::Error) -> ! {
    eprintln!("lohar: fatal: {e:#}");
    eprintln!("lohar: powering off");
    power_off()
}

/// Syncs and ends the machine. Never returns.
fn power_off() -> ! {
    eprintln!("lohar: syncing and powering off");
    nix::unistd::sync();
    // Best effort: a clean read-only root needs no journal replay.
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    let mode = if HALT_BY_REBOOT.load(Ordering::SeqCst) {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    let err = nix::sys::reboot::reboot(mode);
    eprintln!("lohar: reboot(2) failed: {err:?}");
    // PID 1 must not exit, whatever happens.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn boot(cmdline: Cmdline) -> anyhow::Result<()> {
    let dev = cmdline.config_dev.as_deref().unwrap_or(DEFAULT_CONFIG_DEV);
    let guest = load_config(dev)?;
    if guest.token.is_empty() {
        anyhow::bail!("the config drive has an empty token");
    }
    let mut config = AgentConfig::guest_default(guest.token.clone());
    config.env = guest.env.clone();
    apply_user(&mut config, guest.user.as_deref(), guest.workdir.as_deref());
    // Volumes before files and init: both may write into them.
    crate::volumes::mount_all(&guest.mounts, config.uid, config.gid)?;

    apply_hostname(&guest.hostname, Durable::Yes);
    match crate::identity::ensure_machine_id() {
        Ok(true) => tracing::info!("new /etc/machine-id"),
        Ok(false) => {}
        Err(e) => tracing::warn!("/etc/machine-id: {e}"),
    }
    if !guest.dns.is_empty() {
        let mut text: String = guest
            .dns
            .iter()
            .map(|ip| format!("nameserver {ip}\n"))
            .collect();
        // Only plain domain labels: a newline would inject resolv.conf lines.
        let search: Vec<&str> = guest
            .dns_search
            .iter()
            .map(String::as_str)
            .filter(|d| {
                !d.is_empty()
                    && d.len() <= 253
                    && d.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            })
            .collect();
        if !search.is_empty() {
            text.push_str(&format!("search {}\n", search.join(" ")));
        }
        if let Err(e) = write_atomic(Path::new("/etc/resolv.conf"), text.as_bytes(), 0o644) {
            tracing::warn!("/etc/resolv.conf: {e}");
        }
    }
    for f in &guest.files {
        if let Err(e) = place_file(&config, &f.path, f.mode, &f.content) {
            tracing::warn!("placing {}: {e:#}", f.path);
        }
    }
    if let Err(e) = network_up(guest.network.as_ref()) {
        tracing::warn!("network: {e:#}");
    }
    // Ctrl-Alt-Del becomes SIGINT to us (handled below) instead of a reset.
    let _ = nix::sys::reboot::set_cad_enabled(false);

    let transport = cmdline.agent.unwrap_or_else(|| guest.agent.clone());
    tracing::info!(sandbox = %guest.sandbox_id, ?transport, "config applied");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        crate::reaper::start(true)?;
        watch_signals()?;
        let agent = crate::server::AgentState::new(config);
        if let Some(script) = guest.init.filter(|s| !s.trim().is_empty()) {
            start_init_script(&agent, script);
        }
        match transport {
            AgentTransport::Vsock { port } => crate::listen::serve_vsock(agent, port).await,
            AgentTransport::Serial { name } => {
                crate::listen::serve_virtio_serial(agent, &name).await
            }
        }
    })
}

/// The image's user and working dir (when the config names them), and a
/// login shell that exists in this root filesystem.
fn apply_user(config: &mut AgentConfig, user: Option<&str>, workdir: Option<&str>) {
    if let Some(user) = user {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        match crate::user::resolve(user, &read("/etc/passwd"), &read("/etc/group")) {
            Ok(r) => {
                tracing::info!(user, uid = r.uid, gid = r.gid, home = %r.home, "user");
                config.uid = r.uid;
                config.gid = r.gid;
                config.user_name = r.name;
                config.home = r.home;
                if let Some(sh) = r.shell.filter(|sh| {
                    Path::new(sh).is_file() && !sh.ends_with("nologin") && !sh.ends_with("false")
                }) {
                    config.shell = sh;
                }
            }
            Err(e) => tracing::error!("user {user:?}: {e}; commands run as lohar (1000)"),
        }
    }
    if !Path::new(&config.shell).is_file() {
        config.shell = "/bin/sh".into();
    }
    if let Some(w) = workdir.filter(|w| w.starts_with('/')) {
        // Docker creates a missing WORKDIR; so do we (owned by root).
        if let Err(e) = std::fs::create_dir_all(w) {
            tracing::warn!("workdir {w}: {e}");
        }
        config.workdir = Some(w.to_owned());
    }
}

// ---------------------------------------------------------------- mounts

fn mount_one(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> anyhow::Result<()> {
    fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
    match mount(Some(src), target, Some(fstype), flags, data) {
        // Already mounted (the kernel's devtmpfs automount): fine.
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("mount {fstype} on {target}: {e}")),
    }
}

fn mount_early() -> anyhow::Result<()> {
    use MsFlags as F;
    let (nsuid, ndev, nexec) = (F::MS_NOSUID, F::MS_NODEV, F::MS_NOEXEC);
    mount_one("proc", "/proc", "proc", nsuid | ndev | nexec, None)?;
    mount_one("sysfs", "/sys", "sysfs", nsuid | ndev | nexec, None)?;
    // The rest is needed by users, not by the agent: warn and go on.
    let optional: &[(&str, &str, &str, MsFlags, Option<&str>)] = &[
        ("devtmpfs", "/dev", "devtmpfs", nsuid, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            nsuid | nexec,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            nsuid | ndev,
            Some("mode=1777"),
        ),
        ("tmpfs", "/run", "tmpfs", nsuid | ndev, Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", nsuid | ndev, Some("mode=1777")),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nsuid | ndev | nexec,
            Some("nsdelegate"),
        ),
    ];
    for (src, target, fstype, flags, data) in optional {
        if let Err(e) = mount_one(src, target, fstype, *flags, *data) {
            eprintln!("lohar: {e:#}");
        }
    }
    reopen_console();
    // The root may have been mounted read-only (no `rw` on the cmdline).
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT,
        None::<&str>,
    );
    // /dev/ptmx from devtmpfs works with the devpts next to it; only add
    // it if missing. The /dev/fd family is what udev would have made.
    let links = [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ];
    for (link, target) in links {
        if fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    Ok(())
}

/// The kernel gives init /dev/console as fds 0–2 only if the root has a
/// /dev/console node; with devtmpfs mounted now, make sure it does.
fn reopen_console() {
    let valid =
        |fd: i32| nix::fcntl::fcntl(unsafe_borrow(fd), nix::fcntl::FcntlArg::F_GETFD).is_ok();
    if (0..3).all(valid) {
        return;
    }
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which nothing else in
        // this (still single-threaded) process holds as an owned fd.
        unsafe {
            libc::dup2(console.as_raw_fd(), fd);
        }
    }
}

/// A borrowed view of a raw descriptor number for fcntl probing.
fn unsafe_borrow(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used for F_GETFD, which is harmless on a closed fd (it
    // fails with EBADF); the borrow never outlives the probe.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

// ---------------------------------------------------------------- config

/// Mounts the config drive read-only, reads it and unmounts it again.
fn load_config(dev: &str) -> anyhow::Result<GuestConfig> {
    if !Path::new(dev).exists() {
        anyhow::bail!("no config drive at {dev}");
    }
    fs::create_dir_all(CONFIG_MOUNT).with_context(|| format!("mkdir {CONFIG_MOUNT}"))?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some(dev), CONFIG_MOUNT, Some("ext4"), flags, None::<&str>)
        .with_context(|| format!("mounting the config drive {dev}"))?;
    let path = Path::new(CONFIG_MOUNT).join(CONFIG_FILE);
    let read = (|| -> anyhow::Result<Vec<u8>> {
        let len = fs::metadata(&path)?.len();
        if len > MAX_CONFIG_BYTES {
            anyhow::bail!("{} is {len} bytes", path.display());
        }
        Ok(fs::read(&path)?)
    })();
    // Unmount whatever happened: the token must not stay readable.
    if let Err(e) = umount2(CONFIG_MOUNT, MntFlags::MNT_DETACH) {
        tracing::warn!("unmounting the config drive: {e}");
    }
    let _ = fs::remove_dir(CONFIG_MOUNT);
    let bytes = read.with_context(|| format!("reading {CONFIG_FILE} from {dev}"))?;
    GuestConfig::from_json(&bytes).with_context(|| format!("parsing {CONFIG_FILE}"))
}

pub(crate) fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && !h.starts_with(['-', '.'])
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

pub(crate) fn apply_hostname(hostname: &str, durable: Durable) {
    if !valid_hostname(hostname) {
        tracing::warn!("ignoring invalid hostname {hostname:?}");
        return;
    }
    if let Err(e) = nix::unistd::sethostname(hostname) {
        tracing::warn!("sethostname: {e}");
    }
    if let Err(e) = write_atomic_as(
        Path::new("/etc/hostname"),
        format!("{hostname}\n").as_bytes(),
        0o644,
        durable,
    ) {
        tracing::warn!("/etc/hostname: {e}");
    }
    // sudo complains unless the hostname resolves: 127.0.1.1 as Debian does.
    let old = fs::read_to_string("/etc/hosts").unwrap_or_default();
    let hosts = hosts_file(&old, hostname);
    if let Err(e) = write_atomic_as(Path::new("/etc/hosts"), hosts.as_bytes(), 0o644, durable) {
        tracing::warn!("/etc/hosts: {e}");
    }
}

fn hosts_file(old: &str, hostname: &str) -> String {
    let mut out = String::new();
    let has_localhost = old
        .lines()
        .any(|l| l.split_whitespace().skip(1).any(|w| w == "localhost"));
    if !has_localhost {
        out.push_str("127.0.0.1\tlocalhost\n");
    }
    for line in old.lines() {
        if line.split_whitespace().next() != Some("127.0.1.1") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    out
}

/// Replaces `path` via a temp file and rename (also replacing a symlink,
/// e.g. a resolv.conf pointing into systemd's /run).
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_as(path, data, mode, Durable::Yes)
}

/// Whether a write waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durable {
    Yes,
    /// Identity files a reidentify writes: every fresh boot writes them
    /// again (or makes a machine id when the file is not valid), and a
    /// flush per file costs a fork's create tens of milliseconds.
    No,
}

pub(crate) fn write_atomic_as(
    path: &Path,
    data: &[u8],
    mode: u32,
    durable: Durable,
) -> io::Result<()> {
    let existing = fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_file());
    if let (Durable::No, Some(m)) = (durable, existing) {
        // In place: no new inode, rename and unlink for the journal (a
        // fork's create waits for these writes).
        let mut f = OpenOptions::new().write(true).truncate(true).open(path)?;
        f.write_all(data)?;
        if m.permissions().mode() & 0o7777 != mode {
            f.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        return Ok(());
    }
    let tmp = path.with_extension("bhatti-tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    if durable == Durable::Yes {
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// Who owns a file placed at create (from the config drive, or written
/// with `place`): the user under their home or `/workspace`, else root.
pub(crate) fn placed_owner(cfg: &AgentConfig, path: &Path) -> (u32, u32) {
    if path.starts_with(&cfg.home) || path.starts_with("/workspace") {
        (cfg.uid, cfg.gid)
    } else {
        (0, 0)
    }
}

/// Places one file from the config. Under the user's home or /workspace it
/// (and any directory created for it) belongs to the user, else to root.
fn place_file(
    cfg: &AgentConfig,
    path: &str,
    mode: Option<u32>,
    content: &[u8],
) -> anyhow::Result<()> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        anyhow::bail!("the path must be absolute, without '..'");
    }
    let (uid, gid) = placed_owner(cfg, p);
    let parent = p.parent().context("no parent directory")?;
    crate::files::ensure_dirs(parent, uid, gid)?;
    let mode = mode.unwrap_or(0o644) & 0o7777;
    let mut f = File::create(p)?;
    f.write_all(content)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.sync_all()?;
    Ok(())
}

// ---------------------------------------------------------------- network

pub(crate) fn inet_socket() -> io::Result<OwnedFd> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

pub(crate) fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// One socket ioctl taking a pointer to `T`.
pub(crate) fn ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the structure type the request expects
    // (ifreq or rtentry), valid and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(crate) fn sockaddr_v4(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; sockaddr is the
    // generic view the ioctls take of an AF_INET address.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

pub(crate) fn link_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up == 0 {
        req.ifr_ifru.ifru_flags = flags | up;
        ioctl(sock, libc::SIOCSIFFLAGS, &mut req)?;
    }
    Ok(())
}

fn has_ipv4(sock: &OwnedFd, name: &str) -> bool {
    ifreq(name).is_ok_and(|mut req| ioctl(sock, libc::SIOCGIFADDR, &mut req).is_ok())
}

pub(crate) fn configure_ipv4(sock: &OwnedFd, net: &NetworkConfig) -> io::Result<()> {
    let (ip, prefix) = net.cidr().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad address {:?}", net.address),
        )
    })?;
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
    let mut req = ifreq(&net.interface)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(ip);
    ioctl(sock, libc::SIOCSIFADDR, &mut req)?;
    let mut req = ifreq(&net.interface)?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
    ioctl(sock, libc::SIOCSIFNETMASK, &mut req)?;
    link_up(sock, &net.interface)?;
    if let Some(gw) = net.gateway {
        // SAFETY: rtentry is plain old data for which all-zero is valid.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_v4(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        match ioctl(sock, libc::SIOCADDRT, &mut rt) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// lo always; eth0 if present. The kernel's `ip=` argument normally set
/// eth0's address already; the config's static setup is the fallback.
fn network_up(net: Option<&NetworkConfig>) -> anyhow::Result<()> {
    let sock = inet_socket().context("socket")?;
    link_up(&sock, "lo").context("bringing up lo")?;
    let iface = net.map_or("eth0", |n| n.interface.as_str());
    if !Path::new("/sys/class/net").join(iface).exists() {
        tracing::info!("no {iface}: networking is loopback only");
        return Ok(());
    }
    link_up(&sock, iface).with_context(|| format!("bringing up {iface}"))?;
    if let Some(net) = net {
        if !has_ipv4(&sock, iface) {
            configure_ipv4(&sock, net).with_context(|| format!("configuring {iface}"))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- runtime

fn watch_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: powering off"),
            _ = int.recv() => tracing::info!("SIGINT: powering off"),
        }
        power_off();
    });
    Ok(())
}

/// Starts the config's init script as the user, in the session
/// [`INIT_SESSION`]: listed with the other sessions, its output readable
/// as theirs is, kept after it exits. The host gives a script on a
/// sandbox's first boot only (a snapshot restore is no boot at all).
fn start_init_script(agent: &crate::server::Agent, script: String) {
    match crate::pty::start_init(agent, INIT_SESSION, script) {
        Ok(pid) => tracing::info!("init script started (pid {pid}) as session {INIT_SESSION}"),
        Err(e) => tracing::warn!("init script: {}", e.message),
    }
}

pub fn setup_logging() {
    init_logging(true);
}

/// Logs go to stderr: in a VM that is the kernel console, whose captured
/// log should not be full of colour escapes.
fn init_logging(ansi: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("LOHAR_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn sync() -> Reply {
    tokio::task::spawn_blocking(nix::unistd::sync).await.ok();
    Ok(serde_json::json!({}))
}

/// Answers, then syncs and powers off. Only as PID 1.
pub fn request_poweroff() -> Reply {
    if std::process::id() != 1 {
        return Err(bhatti_protocol::ErrorBody::new(
            bhatti_protocol::ErrorCode::Unsupported,
            "shutdown is only available when lohar is PID 1",
        ));
    }
    tokio::spawn(async {
        // A moment for the reply to reach the host before the VM stops.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tracing::info!("shutdown requested by the host");
        let _ = tokio::task::spawn_blocking(|| power_off()).await;
    });
    Ok(serde_json::json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        let c = parse_cmdline(
            "console=ttyS0 root=/dev/vda bhatti.agent=serial:bhatti.agent bhatti.debug \
             bhatti.config=/dev/vdc bhatti.halt=reboot",
        );
        assert_eq!(
            c,
            Cmdline {
                config_dev: Some("/dev/vdc".into()),
                agent: Some(AgentTransport::Serial {
                    name: "bhatti.agent".into()
                }),
                debug: true,
                halt_by_reboot: true,
            }
        );
        let c = parse_cmdline("bhatti.agent=bogus bhatti.config=relative");
        assert_eq!(c, Cmdline::default());
    }

    #[test]
    fn hosts_and_hostnames() {
        let old = "127.0.0.1\tlocalhost\n127.0.1.1\tbhatti\n::1 localhost ip6-localhost\n";
        let new = hosts_file(old, "box-1");
        assert_eq!(
            new,
            "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n127.0.1.1\tbox-1\n"
        );
        assert!(hosts_file("", "x").starts_with("127.0.0.1\tlocalhost\n"));
        assert!(valid_hostname("sb-123.example"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname("-x"));
        assert!(!valid_hostname(&"a".repeat(65)));
    }
}
