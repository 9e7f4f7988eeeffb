//! Where connections come from: a unix socket (test mode), AF_VSOCK
//! (Firecracker) or a virtio-serial port (QEMU).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bhatti_protocol::mux::MuxEnd;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;

use crate::server::{serve_connection, Agent};

/// Test mode: accept connections on a unix socket forever.
pub async fn serve_unix(agent: Agent, path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    tracing::info!("listening on {}", path.display());
    loop {
        let (stream, _) = listener.accept().await?;
        let agent = agent.clone();
        tokio::spawn(async move {
            let (r, w) = stream.into_split();
            serve_connection(agent, r, w, None).await;
        });
    }
}

/// Firecracker (and QEMU vhost-vsock): accept vsock connections on `port`
/// from any CID. Each host connection is one protocol connection; after a
/// snapshot restore the old connections are reset and the host dials again.
pub async fn serve_vsock(agent: Agent, port: u32) -> anyhow::Result<()> {
    use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
        .with_context(|| format!("binding vsock port {port}"))?;
    tracing::info!("listening on vsock port {port}");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tracing::debug!("vsock connection from {peer:?}");
                let agent = agent.clone();
                tokio::spawn(async move {
                    let (r, w) = stream.into_split();
                    serve_connection(agent, r, w, None).await;
                });
            }
            Err(e) => {
                // E.g. out of fds: do not spin on a persistent error.
                tracing::warn!("vsock accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// QEMU: serve on the virtio-serial port named `name`.
///
/// A virtio-serial port is one byte pipe with no connection boundaries:
/// - when the host closes its chardev, reads return 0 (EOF) until it opens
///   it again. That ends the current connection; the agent then waits for
///   the next byte from the host and starts a fresh handshake with it.
/// - after a snapshot restore the guest sees no disconnect at all: the new
///   host simply sends a new `Hello` on the old stream. The multiplexer
///   reports that as [`MuxEnd::Rehello`] and the next connection is served
///   with that `Hello` as its first frame.
///
/// While the host is away the port polls as readable+hangup (level
/// triggered), and tokio treats a hangup as final: its readiness would
/// stay set and every read would spin. So the wait for the host happens
/// on a blocking thread with its own edge-triggered epoll, and each
/// connection registers a fresh duplicate of the fd with tokio.
pub async fn serve_virtio_serial(agent: Agent, name: &str) -> anyhow::Result<()> {
    let dev = find_serial_port(name, Duration::from_secs(10)).await?;
    let file: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(&dev)
        .with_context(|| format!("opening {}", dev.display()))?
        .into();
    tracing::info!("listening on virtio-serial port {name} ({})", dev.display());
    let mut hello = None;
    let mut failures = 0u32;
    loop {
        let end = match serve_serial_once(&agent, &file, hello.take()).await {
            Ok(end) => {
                failures = 0;
                end
            }
            Err(e) => {
                // E.g. out of fds: retry, but never spin.
                failures += 1;
                tracing::warn!("virtio-serial: {e:#}");
                tokio::time::sleep(Duration::from_millis(10u64 << failures.min(7))).await;
                continue;
            }
        };
        match end {
            MuxEnd::Rehello(h) => {
                tracing::info!("virtio-serial: a new Hello (restored or reconnected host)");
                hello = Some(h);
            }
            MuxEnd::Eof => tracing::info!("virtio-serial: the host disconnected"),
            MuxEnd::Io(e) => tracing::warn!("virtio-serial: {e}"),
            MuxEnd::Shutdown => tracing::debug!("virtio-serial: connection ended"),
        }
    }
}

/// Serves one connection on the port: waits for the host's first byte
/// unless a `Hello` is already in hand.
async fn serve_serial_once(
    agent: &Agent,
    file: &OwnedFd,
    hello: Option<bytes::Bytes>,
) -> anyhow::Result<MuxEnd> {
    let prefix = match hello {
        Some(_) => None,
        None => {
            let fd = file.try_clone().context("dup")?;
            let byte = tokio::task::spawn_blocking(move || wait_for_host(&fd))
                .await
                .context("the wait task failed")?
                .context("waiting for the host")?;
            Some(byte)
        }
    };
    let dup = file.try_clone().context("dup")?;
    // SAFETY: the OwnedFd is moved into the AsyncFd, stays open and is the
    // same descriptor for the AsyncFd's whole life; nothing else closes it.
    let registered = unsafe { AsyncFd::register(dup) };
    let port = SerialPort(Arc::new(
        registered
            .map_err(|e| e.into_parts().1)
            .context("registering the virtio-serial port")?,
    ));
    let end = match prefix {
        Some(b) => {
            let reader = std::io::Cursor::new([b]).chain(port.clone());
            serve_connection(agent.clone(), reader, port, None).await
        }
        None => serve_connection(agent.clone(), port.clone(), port, hello).await,
    };
    Ok(end)
}

/// Blocks until the host sends something and returns that first byte.
///
/// Edge-triggered epoll sleeps until the port's wait queue is woken (the
/// host opens the port, or data arrives), however long the hangup lasts.
/// The one-second timeout is only a safety net.
fn wait_for_host(fd: &OwnedFd) -> io::Result<u8> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: plain syscall; the result is checked and owned below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ep` is a new descriptor nothing else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: both descriptors are open; `ev` is a valid epoll_event.
    if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(fd.as_fd(), &mut b) {
            Ok(1) => return Ok(b[0]),
            // EOF: the host is away. EAGAIN: connected, nothing sent yet.
            Ok(_) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let mut out = [libc::epoll_event { events: 0, u64: 0 }];
        // SAFETY: `out` is a valid buffer of one event for the kernel.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 1, 1000) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Finds `/dev/vportNpM` whose sysfs name is `name`, creating the device
/// node if devtmpfs has not (there is no udev in the guest). Ports are
/// announced by the host after the driver starts, so this polls briefly.
async fn find_serial_port(name: &str, timeout: Duration) -> anyhow::Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    let sys = Path::new("/sys/class/virtio-ports");
    loop {
        if let Ok(rd) = std::fs::read_dir(sys) {
            for entry in rd.flatten() {
                let port_name =
                    std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if port_name.trim_end() != name {
                    continue;
                }
                let node = Path::new("/dev").join(entry.file_name());
                if !node.exists() {
                    make_node(&node, &entry.path().join("dev"))?;
                }
                return Ok(node);
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("no virtio-serial port named {name:?} in {}", sys.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn make_node(node: &Path, dev_file: &Path) -> anyhow::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let text = std::fs::read_to_string(dev_file)
        .with_context(|| format!("reading {}", dev_file.display()))?;
    let (major, minor) = text
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .with_context(|| format!("{}: unexpected contents {text:?}", dev_file.display()))?;
    mknod(
        node,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(major, minor),
    )
    .with_context(|| format!("mknod {}", node.display()))
}

/// A virtio-serial port as a tokio byte stream. Clones share the fd, so one
/// clone reads while another writes.
#[derive(Clone)]
struct SerialPort(Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for SerialPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for SerialPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A port cannot be half-closed; the next connection reuses it.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
