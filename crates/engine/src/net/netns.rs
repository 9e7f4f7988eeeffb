//! Running code inside a named network namespace (`/run/netns/<name>`).
//!
//! A socket belongs to the namespace of the thread that created it, for its
//! whole life. So the daemon, which lives in the host namespace, gets a
//! listener on a bridge address inside the guests' namespace by creating it
//! on a thread that has `setns`-ed there, and then hands the socket to tokio
//! like any other. `setns(CLONE_NEWNET)` moves only the calling thread, so
//! it always happens on a thread of our own: never on a tokio worker or
//! blocking-pool thread, which would stay in the namespace for later,
//! unrelated work.
//!
//! [`in_netns`] uses a fresh thread per call (setup paths: binding a
//! listener). [`NetnsWorker`] keeps one thread in the namespace for hot
//! paths, such as the one UDP socket per upstream DNS query.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex, PoisonError};
use std::thread;

use nix::sched::{setns, CloneFlags};
use tokio::net::TcpSocket;

/// Where `ip netns add` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";

/// `/run/netns/<name>`; the name must be a plain file name.
fn ns_path(name: &str) -> io::Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid network namespace name {name:?}"),
        ));
    }
    Ok(Path::new(NETNS_DIR).join(name))
}

/// Opens the namespace on the caller's thread, so a missing one is reported
/// before any thread is started.
fn open_ns(name: &str) -> io::Result<File> {
    File::open(ns_path(name)?)
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {name}: {e}")))
}

fn enter(ns: &File) -> io::Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("setns(CLONE_NEWNET): {e}")))
}

/// Runs `f` inside network namespace `ns` (a name under `/run/netns`), on a
/// fresh thread that is joined; with `None`, on the current thread.
pub fn in_netns<T: Send + 'static>(
    ns: Option<&str>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let Some(name) = ns else {
        return f();
    };
    let file = open_ns(name)?;
    thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            enter(&file)?;
            drop(file);
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("the thread inside the network namespace panicked"))?
}

/// A UDP socket bound to `addr` inside `ns`, nonblocking (ready for
/// `tokio::net::UdpSocket::from_std`).
pub fn bind_udp(ns: Option<&str>, addr: SocketAddr) -> io::Result<UdpSocket> {
    in_netns(ns, move || udp_socket(addr))
}

/// A TCP listener bound to `addr` inside `ns`, nonblocking (ready for
/// `tokio::net::TcpListener::from_std`).
pub fn bind_tcp(ns: Option<&str>, addr: SocketAddr) -> io::Result<TcpListener> {
    in_netns(ns, move || tcp_listener(addr))
}

/// An unconnected TCP socket inside `ns`, of `peer`'s address family; the
/// caller connects it (`TcpSocket::connect`) from async code.
pub fn tcp_socket(ns: Option<&str>, peer: SocketAddr) -> io::Result<TcpSocket> {
    in_netns(ns, move || tcp_socket_for(peer))
}

/// The jobs behind [`bind_udp`], [`bind_tcp`] and [`tcp_socket`], to run on
/// whichever thread is in the right namespace.
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// See [`udp_socket`]. (std sets `SO_REUSEADDR`, so a restarted server
/// rebinds its port at once.)
pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// See [`udp_socket`]. Creating a tokio `TcpSocket` needs no runtime; only
/// connecting it does.
pub fn tcp_socket_for(peer: SocketAddr) -> io::Result<TcpSocket> {
    match peer {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// One long-lived thread inside a namespace that runs short jobs (socket
/// creation) for async code, so a hot path pays a channel round trip rather
/// than a thread per socket. Started on first use; if the namespace was
/// missing then, the next use tries again. With no namespace, jobs run
/// inline.
///
/// The thread keeps its namespace alive: if the namespace is deleted and
/// made again under the same name, this worker still creates sockets in the
/// old one (as do the listeners bound there); the daemon is restarted then.
#[derive(Debug)]
pub struct NetnsWorker {
    ns: Option<String>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

impl NetnsWorker {
    pub fn new(ns: Option<String>) -> NetnsWorker {
        NetnsWorker {
            ns,
            jobs: Mutex::new(None),
        }
    }

    pub fn netns(&self) -> Option<&str> {
        self.ns.as_deref()
    }

    /// Runs `f` inside the namespace and returns what it returned.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let Some(name) = &self.ns else {
            return f();
        };
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            let sender = match jobs.as_ref() {
                Some(sender) => sender.clone(),
                None => jobs.insert(spawn_worker(name)?).clone(),
            };
            if let Err(mpsc::SendError(_)) = sender.send(job) {
                // The thread is gone (a job panicked); start afresh next time.
                *jobs = None;
                return Err(io::Error::other(format!(
                    "the worker thread in network namespace {name} stopped"
                )));
            }
        }
        result.await.map_err(|_| {
            io::Error::other(format!(
                "the worker thread in network namespace {name} dropped a job"
            ))
        })?
    }
}

/// Starts the worker thread and waits until it is inside `name`.
fn spawn_worker(name: &str) -> io::Result<mpsc::Sender<Job>> {
    let file = open_ns(name)?;
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready, entered) = mpsc::sync_channel::<io::Result<()>>(1);
    thread::Builder::new()
        .name("netns-worker".into())
        .spawn(move || {
            let result = enter(&file);
            drop(file);
            let ok = result.is_ok();
            let _ = ready.send(result);
            if ok {
                // Ends when the last sender (the NetnsWorker) is dropped.
                while let Ok(job) = queue.recv() {
                    job();
                }
            }
        })?;
    entered
        .recv()
        .map_err(|_| io::Error::other("the network namespace worker thread died"))??;
    Ok(jobs)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpStream};
    use std::process::Command;
    use std::time::Duration;

    use super::*;

    /// A namespace of this test's own with `lo` up; deleted on drop, even
    /// when the test fails.
    pub(crate) struct TestNetns(pub(crate) String);

    impl TestNetns {
        /// `None` (after one SKIP line) unless root.
        pub(crate) fn create(test: &str) -> Option<TestNetns> {
            if !nix::unistd::geteuid().is_root() {
                bhatti_testkit::skip(test, "needs root (creates a network namespace)");
                return None;
            }
            let name = bhatti_testkit::netns_name("bhatti-dns");
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip netns add {name}");
            let ns = TestNetns(name);
            let ok = Command::new("ip")
                .args(["-n", &ns.0, "link", "set", "lo", "up"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip -n {} link set lo up", ns.0);
            Some(ns)
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            bhatti_testkit::delete_netns(&self.0);
        }
    }

    #[test]
    fn none_runs_on_this_thread() {
        let me = thread::current().id();
        let there = in_netns(None, move || Ok(thread::current().id())).unwrap();
        assert_eq!(me, there);
    }

    #[test]
    fn bad_names_and_missing_namespaces_are_errors() {
        for bad in ["", ".", "..", "a/b", "../etc"] {
            let err = in_netns(Some(bad), || Ok(())).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        let err = in_netns(Some("bhatti-no-such-ns-7f3a"), || Ok(())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = bind_udp(
            Some("bhatti-no-such-ns-7f3a"),
            (Ipv4Addr::LOCALHOST, 0).into(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn errors_of_the_closure_come_back() {
        let err =
            in_netns(None, || -> io::Result<()> { Err(io::Error::other("boom")) }).unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }

    #[test]
    fn a_listener_bound_in_a_namespace_is_reachable_only_from_there() {
        let Some(ns) =
            TestNetns::create("a_listener_bound_in_a_namespace_is_reachable_only_from_there")
        else {
            return;
        };
        let listener = bind_tcp(Some(&ns.0), (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"inside").unwrap();
        });

        // The same address from this test's own namespace: nobody there.
        let outside = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
        assert!(outside.is_err(), "{addr} reached from the host namespace");

        let got = in_netns(Some(&ns.0), move || {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            let mut got = String::new();
            conn.read_to_string(&mut got)?;
            Ok(got)
        })
        .unwrap();
        assert_eq!(got, "inside");
        server.join().unwrap();
    }

    #[tokio::test]
    async fn the_worker_creates_sockets_in_its_namespace() {
        let Some(ns) = TestNetns::create("the_worker_creates_sockets_in_its_namespace") else {
            return;
        };
        let listener = bind_tcp(Some(&ns.0), (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });

        let worker = NetnsWorker::new(Some(ns.0.clone()));
        let socket = worker.run(move || tcp_socket_for(addr)).await.unwrap();
        socket.connect(addr).await.unwrap();
        accept.await.unwrap().unwrap();
        // The same thread serves later jobs.
        for _ in 0..3 {
            let udp = worker
                .run(|| udp_socket((Ipv4Addr::LOCALHOST, 0).into()))
                .await
                .unwrap();
            assert_ne!(udp.local_addr().unwrap().port(), 0);
        }

        // From the host namespace the same address is not there.
        let host = NetnsWorker::new(None);
        let socket = host.run(move || tcp_socket_for(addr)).await.unwrap();
        assert!(socket.connect(addr).await.is_err());

        let missing = NetnsWorker::new(Some("bhatti-no-such-ns-7f3a".into()));
        let err = missing.run(|| Ok(())).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
