//! Where unknown names go: a hickory resolver whose sockets are created
//! inside the guests' namespace.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::{Name, RecordType};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{
    RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime,
};
use hickory_resolver::net::NetError;
use hickory_resolver::Resolver;
use tokio::net::{TcpStream, UdpSocket};

use crate::net::netns::{self, NetnsWorker};

/// How long one upstream gets to answer one query. With one retry this
/// stays under the 5 s a glibc stub waits, so a guest sees SERVFAIL rather
/// than a timeout of its own.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a TCP connection to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where unknown names go: upstream resolvers (ip:port), queried from
/// inside `netns` (the namespace where the user bridges live; `None` = the
/// daemon's own). One is shared by every user's server, and with it one
/// answer cache.
pub struct Upstreams {
    servers: Vec<SocketAddr>,
    netns: Option<String>,
    /// `None` when there are no servers (or the resolver could not be
    /// built): every forwarded query then fails.
    resolver: Option<Resolver<NetnsRuntime>>,
}

impl Upstreams {
    pub fn new(servers: Vec<SocketAddr>, netns: Option<String>) -> Upstreams {
        Upstreams::with_timeout(servers, netns, UPSTREAM_TIMEOUT)
    }

    /// [`Upstreams::new`] with `timeout` per upstream query instead of
    /// [`UPSTREAM_TIMEOUT`].
    pub fn with_timeout(
        servers: Vec<SocketAddr>,
        netns: Option<String>,
        timeout: Duration,
    ) -> Upstreams {
        if netns.is_some() {
            for s in servers.iter().filter(|s| s.ip().is_loopback()) {
                tracing::warn!(upstream = %s, "a loopback DNS upstream is the namespace's own loopback, not the host's");
            }
        }
        let resolver = if servers.is_empty() {
            None
        } else {
            build_resolver(&servers, NetnsRuntime::new(netns.clone()), timeout)
                .inspect_err(|e| tracing::error!("DNS upstream resolver: {e}"))
                .ok()
        };
        Upstreams {
            servers,
            netns,
            resolver,
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Resolves `name` (taken as fully qualified: no search domains, no
    /// `/etc/hosts`) through the upstreams or the cache.
    pub(super) async fn lookup(&self, name: Name, rtype: RecordType) -> Result<Lookup, NetError> {
        let Some(resolver) = &self.resolver else {
            return Err(NetError::NoConnections);
        };
        resolver.lookup(name, rtype).await
    }
}

impl fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstreams")
            .field("servers", &self.servers)
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

fn build_resolver(
    servers: &[SocketAddr],
    runtime: NetnsRuntime,
    timeout: Duration,
) -> Result<Resolver<NetnsRuntime>, NetError> {
    let name_servers = servers
        .iter()
        .map(|s| {
            // UDP first; TCP for truncated answers.
            let mut udp = ConnectionConfig::udp();
            udp.port = s.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = s.port();
            NameServerConfig::new(s.ip(), true, vec![udp, tcp])
        })
        .collect();
    let config = ResolverConfig::from_parts(None, vec![], name_servers);
    let mut builder = Resolver::builder_with_config(config, runtime);
    let opts = builder.options_mut();
    // The host's /etc/hosts is not the guests' business.
    opts.use_hosts_file = ResolveHosts::Never;
    // Relay CNAME chains as upstream gave them.
    opts.preserve_intermediates = true;
    opts.timeout = timeout;
    opts.attempts = 1;
    builder.build()
}

/// The host's own resolv.conf nameservers (IPv4 and IPv6), port 53: the
/// default upstreams. Empty if there is none or the file is unreadable.
pub fn host_upstreams() -> Vec<SocketAddr> {
    match std::fs::read("/etc/resolv.conf") {
        Ok(data) => parse_resolv_conf(&data),
        Err(e) => {
            tracing::warn!("/etc/resolv.conf: {e}");
            Vec::new()
        }
    }
}

/// The `nameserver` lines of a resolv.conf, port 53 (parsed by
/// hickory-resolver's reader of the format).
pub fn parse_resolv_conf(data: &[u8]) -> Vec<SocketAddr> {
    match hickory_resolver::system_conf::parse_resolv_conf(data) {
        Ok((config, _)) => config
            .name_servers()
            .iter()
            .map(|ns| SocketAddr::new(ns.ip, 53))
            .collect(),
        // Also what "no nameservers" is reported as.
        Err(_) => Vec::new(),
    }
}

/// Tokio I/O for hickory, with every socket created inside a namespace by
/// a [`NetnsWorker`]: the resolver then reaches upstreams from where the
/// bridges live, whatever namespace the daemon runs in.
#[derive(Clone)]
pub(super) struct NetnsRuntime {
    tokio: TokioRuntimeProvider,
    worker: Arc<NetnsWorker>,
}

impl NetnsRuntime {
    pub(super) fn new(netns: Option<String>) -> NetnsRuntime {
        NetnsRuntime {
            tokio: TokioRuntimeProvider::default(),
            worker: Arc::new(NetnsWorker::new(netns)),
        }
    }
}

type IoFuture<T> = Pin<Box<dyn Send + Future<Output = io::Result<T>>>>;

impl RuntimeProvider for NetnsRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.tokio.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        wait_for: Option<Duration>,
    ) -> IoFuture<Self::Tcp> {
        let worker = self.worker.clone();
        Box::pin(async move {
            let socket = worker
                .run(move || {
                    let socket = netns::tcp_socket_for(server_addr)?;
                    if let Some(bind_addr) = bind_addr {
                        socket.bind(bind_addr)?;
                    }
                    Ok(socket)
                })
                .await?;
            socket.set_nodelay(true)?;
            let wait_for = wait_for.unwrap_or(CONNECT_TIMEOUT);
            match tokio::time::timeout(wait_for, socket.connect(server_addr)).await {
                Ok(stream) => Ok(AsyncIoTokioAsStd(stream?)),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("TCP connect to {server_addr} timed out"),
                )),
            }
        })
    }

    fn bind_udp(&self, local_addr: SocketAddr, _server_addr: SocketAddr) -> IoFuture<Self::Udp> {
        let worker = self.worker.clone();
        Box::pin(async move {
            let socket = worker.run(move || netns::udp_socket(local_addr)).await?;
            UdpSocket::from_std(socket)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let conf = b"# generated\nsearch example.com\nnameserver 10.255.255.53\n\
                     nameserver 2001:db8::1\noptions ndots:2\nnameserver 127.0.0.53\n";
        assert_eq!(
            parse_resolv_conf(conf),
            vec![
                "10.255.255.53:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap(),
                "127.0.0.53:53".parse().unwrap(),
            ]
        );
        assert!(parse_resolv_conf(b"search example.com\n").is_empty());
        assert!(parse_resolv_conf(b"").is_empty());
        assert!(parse_resolv_conf(b"\xff\xfe garbage\nnameserver nope\n").is_empty());
    }

    #[test]
    fn built_outside_a_runtime() {
        let up = Upstreams::new(vec!["192.0.2.1:53".parse().unwrap()], Some("x".into()));
        assert_eq!(up.servers().len(), 1);
        assert_eq!(up.netns(), Some("x"));
        assert!(up.resolver.is_some());
    }

    #[tokio::test]
    async fn no_servers_fail_every_lookup() {
        let up = Upstreams::new(vec![], None);
        let err = up
            .lookup(Name::from_ascii("example.test.").unwrap(), RecordType::A)
            .await
            .unwrap_err();
        assert!(matches!(err, NetError::NoConnections), "{err}");
    }
}
