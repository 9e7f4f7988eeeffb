//! Tenant networks on real VMs: the daemon (`bhatti serve`, a child
//! process) in a network namespace of the test's own, with a second
//! namespace joined by a veth playing "the internet" (a web server, a UDP
//! sink, an echo server and a DNS server on 203.0.113.10, plus listeners on
//! a metadata and a private address that must stay unreachable). No packet
//! leaves the two namespaces.
//!
//! Users A and B with two sandboxes each check isolation (ICMP, TCP, UDP),
//! sibling names, guest → host, blocked ranges, NAT, egress policies,
//! anti-spoofing (IP and ARP) and a daemon SIGKILL + restart with an open
//! TCP connection from a guest to the internet.

mod api_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_support::*;
use bhatti::store::users::UserCaps;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The internet's address (TEST-NET-3: outside every blocked range).
const NET_IP: &str = "203.0.113.10";
/// The daemon namespace's uplink address: what NAT'd traffic comes from.
const UPLINK_IP: &str = "192.0.2.2";
const METADATA_IP: &str = "169.254.169.254";
const PRIVATE_IP: &str = "10.99.0.1";

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the fake internet saw.
#[derive(Debug, Default)]
struct Seen {
    /// (local address, peer address) of every HTTP connection.
    http: Vec<(SocketAddr, SocketAddr)>,
    /// (peer, payload) of every UDP datagram.
    udp: Vec<(SocketAddr, String)>,
}

/// The "internet" namespace and its servers; removed on drop.
struct Internet {
    ns: String,
    seen: Arc<Mutex<Seen>>,
    echo_conns: Arc<AtomicUsize>,
    tasks: tokio::task::JoinSet<()>,
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.tasks.abort_all();
        bhatti_testkit::delete_netns(&self.ns);
    }
}

impl Internet {
    /// Creates the daemon's namespace `host_ns` too, with a veth into the
    /// internet namespace and a default route through it.
    fn start(host_ns: &str) -> Internet {
        let ns = bhatti_testkit::netns_name("bhatti-inet");
        let mut me = Internet {
            ns: ns.clone(),
            seen: Arc::default(),
            echo_conns: Arc::default(),
            tasks: tokio::task::JoinSet::new(),
        };
        for n in [host_ns, ns.as_str()] {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n", host_ns, "link", "add", "up0", "type", "veth", "peer", "name", "inet0", "netns",
            &ns,
        ]);
        ip(&["-n", host_ns, "addr", "add", "192.0.2.2/24", "dev", "up0"]);
        ip(&["-n", host_ns, "link", "set", "up0", "up"]);
        ip(&["-n", host_ns, "route", "add", "default", "via", "192.0.2.1"]);
        ip(&["-n", &ns, "addr", "add", "192.0.2.1/24", "dev", "inet0"]);
        ip(&["-n", &ns, "link", "set", "inet0", "up"]);
        for a in [NET_IP, METADATA_IP, PRIVATE_IP] {
            ip(&["-n", &ns, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        for port in [80u16, 8080] {
            me.http_server(port);
        }
        me.udp_sink();
        me.echo_server();
        me.dns_server();
        me
    }

    fn tcp(&self, port: u16) -> tokio::net::TcpListener {
        let l =
            bhatti::net::netns::bind_tcp(Some(&self.ns), SocketAddr::from(([0, 0, 0, 0], port)))
                .expect("listen in the internet namespace");
        tokio::net::TcpListener::from_std(l).expect("tokio listener")
    }

    fn udp(&self, addr: SocketAddr) -> tokio::net::UdpSocket {
        let s = bhatti::net::netns::bind_udp(Some(&self.ns), addr).expect("UDP socket");
        tokio::net::UdpSocket::from_std(s).expect("tokio socket")
    }

    /// Answers `from <peer ip>` to any request.
    fn http_server(&mut self, port: u16) {
        let l = self.tcp(port);
        let seen = self.seen.clone();
        self.tasks.spawn(async move {
            while let Ok((mut s, peer)) = l.accept().await {
                let local = s.local_addr().expect("local addr");
                seen.lock().expect("seen").http.push((local, peer));
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let body = format!("from {}\n", peer.ip());
                    let resp = format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
    }

    fn udp_sink(&mut self) {
        let s = self.udp(SocketAddr::from(([0, 0, 0, 0], 9999)));
        let seen = self.seen.clone();
        self.tasks.spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = s.recv_from(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.lock().expect("seen").udp.push((peer, text));
            }
        });
    }

    /// Echoes lines back; counts connections.
    fn echo_server(&mut self) {
        let l = self.tcp(7000);
        let conns = self.echo_conns.clone();
        self.tasks.spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }

    /// The upstream resolver: `example.test A 203.0.113.10`, NXDOMAIN for
    /// everything else.
    fn dns_server(&mut self) {
        use hickory_proto::op::{Message, ResponseCode};
        use hickory_proto::rr::rdata::A;
        use hickory_proto::rr::{RData, Record, RecordType};
        let s = self.udp(SocketAddr::from(([203, 0, 113, 10], 53)));
        self.tasks.spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok((n, peer)) = s.recv_from(&mut buf).await {
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
                resp.metadata.recursion_desired = req.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                let mut found = false;
                for q in &req.queries {
                    resp.add_query(q.clone());
                    let name = q.name().to_ascii().to_ascii_lowercase();
                    if name.trim_end_matches('.') == "example.test" {
                        found = true;
                        if q.query_type() == RecordType::A {
                            resp.add_answer(Record::from_rdata(
                                q.name().clone(),
                                60,
                                RData::A(A([203, 0, 113, 10].into())),
                            ));
                        }
                    }
                }
                if !found {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = s.send_to(&bytes, peer).await;
                }
            }
        });
    }

    fn http_peers_to(&self, local_ip: &str) -> usize {
        self.seen
            .lock()
            .expect("seen")
            .http
            .iter()
            .filter(|(l, _)| l.ip().to_string() == local_ip)
            .count()
    }

    fn udp_payloads(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("seen")
            .udp
            .iter()
            .map(|(_, t)| t.clone())
            .collect()
    }
}

/// In each guest: an HTTP server on 8000 (answers its hostname) and a UDP
/// sink on 9000 logging `<source ip> <payload>` to /tmp/udp.log.
const GUEST_SERVER: &str = r#"
import http.server, socket, threading
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 9000))
    while True:
        d, a = s.recvfrom(2048)
        with open("/tmp/udp.log", "a") as f:
            f.write("%s %s\n" % (a[0], d.decode(errors="replace")))
threading.Thread(target=udp, daemon=True).start()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = ("hello from %s\n" % socket.gethostname()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"#;

/// A TCP client to the internet's echo server that logs `ok N` every
/// 200 ms, and `err …` / `closed` when the connection breaks.
const GUEST_CONN: &str = r#"
import socket, time
s = socket.create_connection(("203.0.113.10", 7000), timeout=10)
f = open("/tmp/conn.log", "a", buffering=1)
i = 0
while True:
    i += 1
    try:
        s.sendall(b"ping %d\n" % i)
        d = s.recv(100)
        if not d:
            f.write("closed\n")
            break
        f.write("ok %d\n" % i)
    except Exception as e:
        f.write("err %s\n" % e)
        break
    time.sleep(0.2)
"#;

fn udp_send(to: &str, port: u16, payload: &str, bind: Option<&str>) -> String {
    let bind = bind
        .map(|b| format!("s.bind(('{b}', 0)); "))
        .unwrap_or_default();
    format!(
        "python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); {bind}s.sendto(b'{payload}', ('{to}', {port}))\""
    )
}

struct Sb {
    name: String,
    ip: String,
    gateway: String,
}

fn sb_of(v: &Value) -> Sb {
    Sb {
        name: v["name"].as_str().expect("name").to_owned(),
        ip: v["network"]["ip"].as_str().expect("network.ip").to_owned(),
        gateway: v["network"]["gateway"]
            .as_str()
            .expect("network.gateway")
            .to_owned(),
    }
}

/// Runs `script`; asserts exit 0 and returns stdout.
async fn ok(c: &Client, sb: &str, script: &str) -> String {
    let (code, out, err) = c.sh(sb, script).await;
    assert_eq!(code, 0, "in {sb}: `{script}` failed: {out}{err}");
    out
}

/// Runs `script`; asserts a non-zero exit.
async fn fails(c: &Client, sb: &str, script: &str) {
    let (code, out, err) = c.sh(sb, script).await;
    assert_ne!(code, 0, "in {sb}: `{script}` should fail: {out}{err}");
}

async fn start_servers(c: &Client, sb: &str) {
    c.put(
        &format!("/sandboxes/{sb}/files?path=/home/lohar/srv.py"),
        GUEST_SERVER,
    )
    .await
    .expect(200);
    c.post(
        &format!("/sandboxes/{sb}/exec"),
        json!({"cmd": ["python3", "/home/lohar/srv.py"], "detach": true}),
    )
    .await
    .expect(200);
}

async fn wait_server(c: &Client, sb: &str) {
    eventually(
        &format!("the HTTP server in {sb}"),
        Duration::from_secs(120),
        || async move {
            let (code, _, _) = c
                .sh(
                    sb,
                    "curl -sf --max-time 2 http://127.0.0.1:8000/ >/dev/null",
                )
                .await;
            (code == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_networks_isolate_resolve_nat_and_survive_restart() {
    let Some(art) = artifacts("tenant_networks_isolate_resolve_nat_and_survive_restart") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let env = Env::new(art);
    let inet = Internet::start(&env.ns);
    let mut cfg = env.config();
    cfg.network.dns_upstreams = vec![NET_IP.to_string()];
    std::fs::write(
        env.dir.path().join("bhatti.toml"),
        toml::to_string(&cfg).expect("config TOML"),
    )
    .expect("write config");
    let key_a = env.user("alice", UserCaps::default());
    let key_b = env.user("bob", UserCaps::default());
    let mut daemon = Proc::spawn(&env, 1);
    ready(&env, &mut daemon, 1).await;
    let a = env.client(Some(&key_a));
    let b = env.client(Some(&key_b));

    let (a1, a2, b1, b2) = tokio::join!(
        a.post("/sandboxes", json!({"name": "a1"})),
        a.post("/sandboxes", json!({"name": "a2"})),
        b.post("/sandboxes", json!({"name": "b1"})),
        b.post(
            "/sandboxes",
            json!({"name": "b2", "network": {"egress": "deny"}})
        ),
    );
    let (a1, a2, b1, b2) = (
        sb_of(&a1.expect(201)),
        sb_of(&a2.expect(201)),
        sb_of(&b1.expect(201)),
        sb_of(&b2.expect(201)),
    );
    // One /24 and one gateway per user.
    assert_eq!(a1.gateway, a2.gateway);
    assert_eq!(b1.gateway, b2.gateway);
    assert_ne!(a1.gateway, b1.gateway);
    assert_ne!(a1.ip, a2.ip);
    let v = b.get("/sandboxes/b2").await.expect(200);
    assert_eq!(v["network"]["egress"], "deny", "{v}");
    assert_eq!(v["network"]["dns_name"], "b2.sb", "{v}");

    for (c, s) in [(&a, &a1), (&a, &a2), (&b, &b1), (&b, &b2)] {
        start_servers(c, &s.name).await;
    }
    for (c, s) in [(&a, &a1), (&a, &a2), (&b, &b1), (&b, &b2)] {
        wait_server(c, &s.name).await;
    }

    // --- One user's sandboxes reach each other, by address and by name.
    ok(&a, "a1", &format!("ping -c1 -W5 {}", a2.ip)).await;
    let body = ok(&a, "a1", "curl -sf --max-time 10 http://a2:8000/").await;
    assert!(body.contains("hello from a2"), "{body}");
    let hosts = ok(&a, "a1", "getent hosts a2.sb").await;
    assert!(hosts.starts_with(&a2.ip), "{hosts}");
    let body = ok(&b, "b2", "curl -sf --max-time 10 http://b1:8000/").await;
    assert!(body.contains("hello from b1"), "{body}");

    // --- Different users: nothing passes, either way.
    fails(&a, "a1", &format!("ping -c1 -W2 {}", b1.ip)).await;
    fails(&b, "b1", &format!("ping -c1 -W2 {}", a1.ip)).await;
    fails(
        &a,
        "a1",
        &format!("curl -sf --max-time 3 http://{}:8000/", b1.ip),
    )
    .await;
    fails(
        &b,
        "b1",
        &format!("curl -sf --max-time 3 http://{}:8000/", a1.ip),
    )
    .await;
    ok(&a, "a1", &udp_send(&b1.ip, 9000, "from-a1", None)).await;
    ok(&b, "b1", &udp_send(&a1.ip, 9000, "from-b1", None)).await;
    // Controls: the same-user datagrams arrive, so the others had time to.
    ok(&a, "a2", &udp_send(&a1.ip, 9000, "from-a2", None)).await;
    ok(&b, "b2", &udp_send(&b1.ip, 9000, "from-b2", None)).await;
    for (c, sb, want) in [(&a, "a1", "from-a2"), (&b, "b1", "from-b2")] {
        eventually(
            &format!("{want} in {sb}"),
            Duration::from_secs(30),
            || async move {
                let (_, log, _) = c.sh(sb, "cat /tmp/udp.log 2>/dev/null").await;
                log.contains(want).then_some(())
            },
        )
        .await;
    }
    let (_, log, _) = b.sh("b1", "cat /tmp/udp.log").await;
    assert!(!log.contains("from-a1"), "{log}");
    let (_, log, _) = a.sh("a1", "cat /tmp/udp.log").await;
    assert!(!log.contains("from-b1"), "{log}");
    // B's resolver does not know A's names, and A's does not know B's.
    fails(&b, "b1", "getent hosts a1").await;
    fails(&b, "b1", "getent hosts a1.sb").await;
    fails(&a, "a1", "getent hosts b1.sb").await;

    // --- Guest → host: nothing but DNS on its own gateway.
    let host_listener =
        bhatti::net::netns::bind_tcp(Some(&env.ns), SocketAddr::from(([0, 0, 0, 0], 8888)))
            .expect("host listener");
    let host_listener = tokio::net::TcpListener::from_std(host_listener).expect("tokio listener");
    let host_accepts = Arc::new(AtomicUsize::new(0));
    let counter = host_accepts.clone();
    let host_task = tokio::spawn(async move {
        while let Ok((_s, _)) = host_listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    for target in [&a1.gateway, &b1.gateway, &UPLINK_IP.to_string()] {
        fails(
            &a,
            "a1",
            &format!("curl -s --max-time 3 http://{target}:8888/"),
        )
        .await;
    }
    assert_eq!(host_accepts.load(Ordering::SeqCst), 0);
    host_task.abort();

    // --- Blocked ranges stay unreachable even though routes lead there.
    for target in [METADATA_IP, PRIVATE_IP] {
        fails(&a, "a1", &format!("curl -s --max-time 3 http://{target}/")).await;
        assert_eq!(inet.http_peers_to(target), 0, "{target} was reached");
    }

    // --- The internet: reachable, through NAT.
    let body = ok(
        &a,
        "a1",
        &format!("curl -sf --max-time 10 http://{NET_IP}/"),
    )
    .await;
    assert_eq!(body.trim(), format!("from {UPLINK_IP}"), "not NAT'd");
    let hosts = ok(&a, "a1", "getent hosts example.test").await;
    assert!(hosts.starts_with(NET_IP), "upstream answer: {hosts}");
    fails(&a, "a1", "getent hosts nope.test").await;

    // --- A rename is visible to siblings at once.
    a.patch("/sandboxes/a2", json!({"name": "web"}))
        .await
        .expect(200);
    let hosts = ok(&a, "a1", "getent hosts web").await;
    assert!(hosts.starts_with(&a2.ip), "{hosts}");
    fails(&a, "a1", "getent hosts a2").await;

    // --- Egress policies.
    // b2 was created with egress "deny".
    fails(&b, "b2", &format!("curl -s --max-time 3 http://{NET_IP}/")).await;
    b.patch(
        "/sandboxes/b2",
        json!({"network": {"egress": "deny", "allow": [format!("{NET_IP}/32:80")]}}),
    )
    .await
    .expect(200);
    ok(
        &b,
        "b2",
        &format!("curl -sf --max-time 10 http://{NET_IP}/"),
    )
    .await;
    fails(
        &b,
        "b2",
        &format!("curl -s --max-time 3 http://{NET_IP}:8080/"),
    )
    .await;
    // Flipped on a running sandbox, both ways.
    let v = a
        .patch("/sandboxes/a1", json!({"network": {"egress": "deny"}}))
        .await
        .expect(200);
    assert_eq!(v["network"]["egress"], "deny", "{v}");
    fails(&a, "a1", &format!("curl -s --max-time 3 http://{NET_IP}/")).await;
    ok(&a, "a1", "curl -sf --max-time 10 http://web:8000/").await;
    a.patch("/sandboxes/a1", json!({"network": {"egress": "allow"}}))
        .await
        .expect(200);
    ok(
        &a,
        "a1",
        &format!("curl -sf --max-time 10 http://{NET_IP}/"),
    )
    .await;
    // Bad policies change nothing.
    let e = a
        .patch("/sandboxes/a1", json!({"network": {"egress": "sometimes"}}))
        .await
        .expect_err(400);
    assert!(e.contains("network.egress"), "{e}");
    let e = a
        .patch(
            "/sandboxes/a1",
            json!({"network": {"allow": ["10.1.2.3/8"]}}),
        )
        .await
        .expect_err(400);
    assert!(e.contains("network.allow"), "{e}");
    ok(
        &a,
        "a1",
        &format!("curl -sf --max-time 10 http://{NET_IP}/"),
    )
    .await;

    // --- Anti-spoofing: "web" (a2) takes a1's address as its own.
    let mac_a1 = ok(&a, "a1", "cat /sys/class/net/eth0/address").await;
    let mac_a1 = mac_a1.trim().to_owned();
    ok(
        &a,
        "web",
        &format!("sudo ip addr add {}/32 dev eth0", a1.ip),
    )
    .await;
    // A datagram with a forged source is not delivered; a genuine one is.
    ok(&a, "web", &udp_send(NET_IP, 9999, "spoofed", Some(&a1.ip))).await;
    ok(&a, "web", &udp_send(NET_IP, 9999, "genuine", None)).await;
    eventually("the genuine datagram", Duration::from_secs(30), || async {
        inet.udp_payloads()
            .iter()
            .any(|p| p == "genuine")
            .then_some(())
    })
    .await;
    assert!(
        !inet.udp_payloads().iter().any(|p| p == "spoofed"),
        "{:?}",
        inet.udp_payloads()
    );
    // ARP: the host asks who has a1's address; only a1's answer counts.
    let bridge_of = |user: &str| {
        let u = bhatti::store::Store::open(env.data_dir().join("bhatti.db"))
            .expect("store")
            .with(|c| bhatti::store::users::get_by_name(c, user))
            .expect("user")
            .expect("user exists");
        format!("bhatti-u{}", u.net_index)
    };
    let bridge = bridge_of("alice");
    let probe = bhatti::net::netns::bind_udp(Some(&env.ns), SocketAddr::from(([0, 0, 0, 0], 0)))
        .expect("probe socket");
    let a1_addr: SocketAddr = format!("{}:9000", a1.ip).parse().expect("a1 address");
    for _ in 0..3 {
        ip(&["-n", &env.ns, "neigh", "flush", "dev", &bridge]);
        // Any packet to a1 makes the host ask who has its address.
        let _ = probe.send_to(b"arp-probe", a1_addr);
        let neigh = eventually(
            "the host to resolve a1",
            Duration::from_secs(30),
            || async {
                let out = std::process::Command::new("ip")
                    .args(["-n", &env.ns, "neigh", "show", &a1.ip])
                    .output()
                    .expect("ip neigh");
                let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
                text.contains("lladdr").then_some(text)
            },
        )
        .await;
        assert!(
            neigh.contains(&mac_a1),
            "a1's address resolved elsewhere: {neigh}"
        );
    }
    let body = ok(
        &a,
        "a1",
        &format!("curl -sf --max-time 10 http://{NET_IP}/"),
    )
    .await;
    assert!(body.contains(UPLINK_IP), "{body}");
    ok(
        &a,
        "web",
        &format!("sudo ip addr del {}/32 dev eth0", a1.ip),
    )
    .await;

    // --- SIGKILL the daemon with a guest's TCP connection open.
    a.put("/sandboxes/a1/files?path=/home/lohar/conn.py", GUEST_CONN)
        .await
        .expect(200);
    a.post(
        "/sandboxes/a1/exec",
        json!({"cmd": ["python3", "/home/lohar/conn.py"], "detach": true}),
    )
    .await
    .expect(200);
    let oks = |log: &str| log.lines().filter(|l| l.starts_with("ok ")).count();
    let before = eventually(
        "the connection running",
        Duration::from_secs(60),
        || async {
            let (_, log, _) = a.sh("a1", "cat /tmp/conn.log 2>/dev/null").await;
            (oks(&log) >= 3).then_some(oks(&log))
        },
    )
    .await;
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10)).await;
    // Leftovers of a crash that look like bhatti's: a user bridge no user
    // has, and a TAP no sandbox owns. The next start removes them.
    ip(&[
        "-n",
        &env.ns,
        "link",
        "add",
        "bhatti-u9999",
        "type",
        "bridge",
    ]);
    ip(&[
        "-n",
        &env.ns,
        "tuntap",
        "add",
        "dev",
        "bt0123456789abc",
        "mode",
        "tap",
    ]);
    ip(&["-n", &env.ns, "link", "add", "keepme0", "type", "bridge"]);
    let mut daemon = Proc::spawn(&env, 2);
    ready(&env, &mut daemon, 2).await;
    // The connection carried on through the restart.
    eventually(
        "the connection after the restart",
        Duration::from_secs(60),
        || async {
            let (_, log, _) = a.sh("a1", "cat /tmp/conn.log").await;
            assert!(
                !log.contains("err") && !log.contains("closed"),
                "the connection broke: {log}"
            );
            (oks(&log) >= before + 10).then_some(())
        },
    )
    .await;
    assert_eq!(inet.echo_conns.load(Ordering::SeqCst), 1, "it reconnected");
    let links = std::process::Command::new("ip")
        .args(["-n", &env.ns, "-o", "link", "show"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("bhatti-u9999"), "{links}");
    assert!(!links.contains("bt0123456789abc"), "{links}");
    assert!(links.contains("keepme0"), "not bhatti's: {links}");
    // Rules and names are back.
    let tables = std::process::Command::new("ip")
        .args(["netns", "exec", &env.ns, "nft", "list", "tables"])
        .output()
        .expect("nft");
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(tables.contains("inet bhatti"), "{tables}");
    let hosts = ok(&a, "a1", "getent hosts web.sb").await;
    assert!(hosts.starts_with(&a2.ip), "{hosts}");
    fails(&a, "a1", &format!("ping -c1 -W2 {}", b1.ip)).await;
    fails(
        &b,
        "b2",
        &format!("curl -s --max-time 3 http://{NET_IP}:8080/"),
    )
    .await;
    ok(
        &b,
        "b2",
        &format!("curl -sf --max-time 10 http://{NET_IP}/"),
    )
    .await;
    let body = ok(&a, "a1", "curl -sf --max-time 10 http://web:8000/").await;
    assert!(body.contains("hello from a2"), "{body}");

    // --- Destroy: a user's last sandbox takes their bridge with it.
    b.delete("/sandboxes/b1").await.expect(204);
    b.delete("/sandboxes/b2").await.expect(204);
    let links = std::process::Command::new("ip")
        .args(["-n", &env.ns, "-o", "link", "show"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(links.contains(&format!(" {bridge}:")), "{links}");
    let bob = bridge_of("bob");
    assert_ne!(bob, bridge);
    assert!(
        !links.contains(&format!(" {bob}:")),
        "bob's bridge is still there: {links}"
    );
    drop(daemon);
}
