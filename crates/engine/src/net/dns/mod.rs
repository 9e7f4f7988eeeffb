//! Sibling DNS: one small resolver per user, on the user's gateway
//! (UDP and TCP port 53 on the bridge address, inside the guests'
//! namespace), built on hickory-server.
//!
//! What a query gets, for the server of user U (suffix `sb`):
//!
//! - `web`, `web.sb` (any case, with or without the final dot), where `web`
//!   is one of U's sandboxes: its address for A and ANY, TTL
//!   [`SIBLING_TTL`]; NOERROR without records for every other type (AAAA
//!   above all, so clients do not wait for one). Authoritative.
//! - any other name under `sb`, and any other single-label name: NXDOMAIN,
//!   authoritative, never forwarded. `*.sb` is ours, and single labels are
//!   the sandbox namespace: sending them to the host's resolver would only
//!   leak sandbox names (and, with LLMNR or search lists upstream, could
//!   answer them with host-side machines). Other users' names are never
//!   seen. `sb` itself is NOERROR without records. No SOA is attached, so
//!   negative answers are not cached: names appear as sandboxes are made.
//! - everything else: forwarded, and the answer relayed (every record type,
//!   CNAME chains, authority and additional sections); NXDOMAIN stays
//!   NXDOMAIN (with upstream's SOA), and an upstream failure, or no
//!   upstream at all, is SERVFAIL. RA is set on every answer.
//! - zone transfers and classes other than IN: REFUSED.
//!
//! Forwarding goes through one hickory-resolver shared by every user's
//! server ([`Upstreams`]): it brings the upstream pool, failover, UDP with
//! TCP on truncation, and a bounded answer cache. Its sockets must be
//! created inside the guests' namespace (the daemon runs in the host's, and
//! the namespace may have its own routes and NAT), so the resolver runs on a
//! custom hickory `RuntimeProvider` whose `bind_udp` and `connect_tcp`
//! create each socket on a thread parked in that namespace
//! ([`crate::net::netns::NetnsWorker`]); I/O then proceeds on tokio as
//! usual. Upstream's header is not relayed: a forwarded answer is rebuilt
//! from the lookup, with the client's ID and RD, RA set and AA clear.
//!
//! Each server is one hickory `Server` with one UDP socket and one TCP
//! listener (two tasks per user); hickory parses requests (a malformed one
//! gets FORMERR or is dropped), frames TCP and truncates UDP answers to
//! what the client accepts. A server holds at most [`MAX_FORWARDS`]
//! forwarded queries in flight; idle TCP connections close after
//! [`TCP_IDLE`].

mod handler;
mod names;
mod upstream;

#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;

use crate::net::netns;
use handler::Handler;
pub use handler::{MAX_FORWARDS, SIBLING_TTL};
pub use names::DnsNames;
pub use upstream::{host_upstreams, parse_resolv_conf, Upstreams, UPSTREAM_TIMEOUT};

/// A TCP connection with no request for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 16;

/// One user's resolver: UDP and TCP on one address (the user's gateway,
/// port 53). Dropping it stops it (its tasks are aborted and its sockets
/// closed); [`DnsServer::shutdown`] also waits for that.
pub struct DnsServer {
    server: Server<Handler>,
    udp: SocketAddr,
    tcp: SocketAddr,
}

impl DnsServer {
    /// Binds `addr` (UDP and TCP) inside `netns` and starts serving
    /// `user_id`'s names. With port 0, UDP gets a free port and TCP the same
    /// one if it is free too; see [`DnsServer::udp_addr`] and
    /// [`DnsServer::tcp_addr`].
    pub async fn spawn(
        addr: SocketAddr,
        netns: Option<String>,
        user_id: String,
        names: Arc<DnsNames>,
        upstreams: Arc<Upstreams>,
    ) -> io::Result<DnsServer> {
        // Binding starts a thread that enters the namespace; keep that off
        // the runtime's workers.
        let (udp, tcp) = tokio::task::spawn_blocking(move || {
            netns::in_netns(netns.as_deref(), move || bind_pair(addr))
        })
        .await
        .map_err(io::Error::other)??;
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let (udp_addr, tcp_addr) = (udp.local_addr()?, tcp.local_addr()?);

        let mut server = Server::new(Handler::new(user_id, names, upstreams));
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
        Ok(DnsServer {
            server,
            udp: udp_addr,
            tcp: tcp_addr,
        })
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    /// Stops serving and waits until the sockets are closed.
    pub async fn shutdown(mut self) {
        if let Err(e) = self.server.shutdown_gracefully().await {
            tracing::debug!(udp = %self.udp, "DNS server stopped: {e}");
        }
    }
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

/// The UDP socket and TCP listener of one server, on one port if possible.
fn bind_pair(addr: SocketAddr) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = netns::udp_socket(addr)?;
    let tcp = if addr.port() == 0 {
        let same = SocketAddr::new(addr.ip(), udp.local_addr()?.port());
        netns::tcp_listener(same).or_else(|_| netns::tcp_listener(addr))?
    } else {
        netns::tcp_listener(addr)?
    };
    Ok((udp, tcp))
}
