//! Real servers on loopback (or inside a namespace of the test's own),
//! queried with hickory's client over UDP and TCP; the upstream is a
//! hickory server of the test's own.

use std::iter;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::DnsResponse;
use hickory_proto::op::{Edns, Message, Metadata, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::net::client::ClientHandle;
use hickory_server::net::runtime::{RuntimeProvider, Time, TokioRuntimeProvider};
use hickory_server::net::tcp::TcpClientStream;
use hickory_server::net::udp::UdpClientStream;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::io::AsyncWriteExt;

use super::upstream::NetnsRuntime;
use super::*;
use crate::net::netns::tests::TestNetns;

const WEB: Ipv4Addr = Ipv4Addr::new(10, 192, 0, 2);
const DB: Ipv4Addr = Ipv4Addr::new(10, 192, 0, 3);
const SECRET: Ipv4Addr = Ipv4Addr::new(10, 192, 1, 2);
const EXAMPLE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EXAMPLE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const BIG_TXT: usize = 30;

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("test name")
}

// ---- the fake upstream ----------------------------------------------------

/// Answers a small `test.` zone and counts the requests it gets.
struct FakeZone {
    hits: Arc<AtomicUsize>,
    tcp_hits: Arc<AtomicUsize>,
}

/// (rcode, answers, authorities) for one question.
fn fake_zone(qname: &str, qtype: RecordType) -> (ResponseCode, Vec<Record>, Vec<Record>) {
    let rec = |owner: &str, data: RData| Record::from_rdata(name(owner), 60, data);
    let soa = || {
        let soa = SOA::new(name("ns.test."), name("admin.test."), 1, 60, 60, 60, 30);
        vec![rec("test.", RData::SOA(soa))]
    };
    let ok = |answers| (ResponseCode::NoError, answers, vec![]);
    use RecordType as T;
    match (qname, qtype) {
        ("example.test.", T::A) => ok(vec![rec("example.test.", RData::A(A(EXAMPLE)))]),
        ("example.test.", T::AAAA) => ok(vec![rec("example.test.", RData::AAAA(AAAA(EXAMPLE6)))]),
        ("alias.test.", T::A) => ok(vec![
            rec("alias.test.", RData::CNAME(CNAME(name("example.test.")))),
            rec("example.test.", RData::A(A(EXAMPLE))),
        ]),
        ("mail.test.", T::MX) => ok(vec![rec(
            "mail.test.",
            RData::MX(MX::new(10, name("example.test."))),
        )]),
        ("text.test.", T::TXT) => ok(vec![rec(
            "text.test.",
            RData::TXT(TXT::new(vec!["hello upstream".into()])),
        )]),
        // Too big for one UDP answer: the resolver must come back over TCP.
        ("big.test.", T::TXT) => ok((0..BIG_TXT)
            .map(|i| {
                let text = format!("{i:02}{}", "x".repeat(98));
                rec("big.test.", RData::TXT(TXT::new(vec![text])))
            })
            .collect()),
        ("fail.test.", _) => (ResponseCode::ServFail, vec![], vec![]),
        ("example.test." | "alias.test." | "mail.test." | "text.test." | "big.test.", _) => {
            (ResponseCode::NoError, vec![], soa())
        }
        _ => (ResponseCode::NXDomain, vec![], soa()),
    }
}

#[async_trait::async_trait]
impl RequestHandler for FakeZone {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut handle: R,
    ) -> ResponseInfo {
        self.hits.fetch_add(1, Ordering::SeqCst);
        if request.protocol() == Protocol::Tcp {
            self.tcp_hits.fetch_add(1, Ordering::SeqCst);
        }
        let (rcode, answers, authorities) = match request.request_info() {
            Ok(info) => fake_zone(&info.query.name().to_string(), info.query.query_type()),
            Err(_) => (ResponseCode::FormErr, vec![], vec![]),
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        metadata.response_code = rcode;
        let edns = request.edns.as_ref().map(|req| {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().max(512));
            edns
        });
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            answers.iter(),
            authorities.iter(),
            iter::empty(),
            iter::empty(),
        );
        handle
            .send_response(response)
            .await
            .expect("fake upstream reply")
    }
}

struct FakeUpstream {
    _server: Server<FakeZone>,
    /// UDP and TCP.
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    tcp_hits: Arc<AtomicUsize>,
}

impl FakeUpstream {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn tcp_hits(&self) -> usize {
        self.tcp_hits.load(Ordering::SeqCst)
    }
}

/// A fake upstream on 127.0.0.1 (of `ns`), UDP and TCP on one port.
async fn fake_upstream(ns: Option<&str>) -> FakeUpstream {
    let ns = ns.map(str::to_owned);
    let (udp, tcp) = tokio::task::spawn_blocking(move || {
        netns::in_netns(ns.as_deref(), || {
            for _ in 0..20 {
                let (udp, tcp) = bind_pair((Ipv4Addr::LOCALHOST, 0).into())?;
                if udp.local_addr()?.port() == tcp.local_addr()?.port() {
                    return Ok((udp, tcp));
                }
            }
            Err(std::io::Error::other("no port free for both UDP and TCP"))
        })
    })
    .await
    .unwrap()
    .unwrap();
    let addr = udp.local_addr().unwrap();
    let (hits, tcp_hits) = (Arc::default(), Arc::default());
    let mut server = Server::new(FakeZone {
        hits: Arc::clone(&hits),
        tcp_hits: Arc::clone(&tcp_hits),
    });
    server.register_socket(tokio::net::UdpSocket::from_std(udp).unwrap());
    server.register_listener(
        tokio::net::TcpListener::from_std(tcp).unwrap(),
        Duration::from_secs(5),
        16,
    );
    FakeUpstream {
        _server: server,
        addr,
        hits,
        tcp_hits,
    }
}

// ---- the server under test and a client -------------------------------------

fn names() -> Arc<DnsNames> {
    let names = DnsNames::new("sb");
    names.set("a", "web", WEB);
    names.set("a", "db", DB);
    names.set("b", "secret", SECRET);
    Arc::new(names)
}

async fn server(names: Arc<DnsNames>, upstreams: Upstreams) -> DnsServer {
    DnsServer::spawn(
        (Ipv4Addr::LOCALHOST, 0).into(),
        None,
        "a".into(),
        names,
        Arc::new(upstreams),
    )
    .await
    .expect("DNS server")
}

#[derive(Debug, Clone, Copy)]
enum Via {
    Udp,
    Tcp,
}

const BOTH: [Via; 2] = [Via::Udp, Via::Tcp];

fn addr_of(s: &DnsServer, via: Via) -> SocketAddr {
    match via {
        Via::Udp => s.udp_addr(),
        Via::Tcp => s.tcp_addr(),
    }
}

/// One query with hickory's client, its sockets made by `provider`.
async fn ask_with<P: RuntimeProvider>(
    provider: P,
    s: &DnsServer,
    via: Via,
    qname: &str,
    qtype: RecordType,
) -> Message {
    let server = addr_of(s, via);
    let timeout = Duration::from_secs(5);
    // The provider owns the client's background task: keep it until the
    // answer is in.
    let mut client = match via {
        Via::Udp => UdpClientStream::builder(server, provider.clone())
            .with_timeout(Some(timeout))
            .exchange(),
        Via::Tcp => TcpClientStream::exchange(server, None, timeout, None, provider.clone())
            .await
            .expect("TCP connect"),
    };
    let answer = client
        .query(name(qname), DNSClass::IN, qtype)
        .await
        .map(DnsResponse::into_message)
        .unwrap_or_else(|e| panic!("{qname} {qtype} over {via:?}: {e}"));
    drop(provider);
    answer
}

async fn ask(s: &DnsServer, via: Via, qname: &str, qtype: RecordType) -> Message {
    ask_with(TokioRuntimeProvider::default(), s, via, qname, qtype).await
}

fn a_records(r: &Message) -> Vec<Ipv4Addr> {
    r.answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// Asserts rcode and flags; `aa` for our own answers.
fn check(r: &Message, rcode: ResponseCode, aa: bool, what: &str) {
    assert_eq!(r.metadata.response_code, rcode, "{what}: {r:?}");
    assert_eq!(r.metadata.authoritative, aa, "{what}: AA");
    assert!(r.metadata.recursion_available, "{what}: RA");
}

// ---- tests ------------------------------------------------------------------

#[tokio::test]
async fn siblings_answer_on_udp_and_tcp_and_only_the_users_own() {
    let up = fake_upstream(None).await;
    let s = server(names(), Upstreams::new(vec![up.addr], None)).await;
    for via in BOTH {
        for q in ["web", "web.sb", "WEB.SB.", "Web.Sb"] {
            let r = ask(&s, via, q, RecordType::A).await;
            check(&r, ResponseCode::NoError, true, q);
            assert_eq!(a_records(&r), vec![WEB], "{q} over {via:?}");
            assert_eq!(r.answers[0].ttl, SIBLING_TTL);
            let owner = r.answers[0].name.to_string();
            assert_eq!(
                owner.trim_end_matches('.'),
                q.trim_end_matches('.'),
                "the name asked"
            );
        }
        let r = ask(&s, via, "db.sb.", RecordType::ANY).await;
        assert_eq!(a_records(&r), vec![DB]);

        // The name exists, just not with these types: NOERROR, no records.
        for qtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
            let r = ask(&s, via, "web.sb", qtype).await;
            check(&r, ResponseCode::NoError, true, "web AAAA");
            assert!(r.answers.is_empty(), "{qtype}: {r:?}");
        }

        // Another user's sandbox, unknown names under the suffix, unknown
        // single labels: NXDOMAIN from us.
        for q in ["secret", "secret.sb.", "nope.sb", "x.web.sb", "nosuch"] {
            let r = ask(&s, via, q, RecordType::A).await;
            check(&r, ResponseCode::NXDomain, true, q);
            assert!(r.answers.is_empty(), "{q}: {r:?}");
        }
        let r = ask(&s, via, "sb.", RecordType::SOA).await;
        check(&r, ResponseCode::NoError, true, "the suffix");
        assert!(r.answers.is_empty());
    }
    assert_eq!(up.hits(), 0, "sandbox names went upstream");
}

#[tokio::test]
async fn other_names_are_forwarded_and_relayed() {
    let up = fake_upstream(None).await;
    let s = server(names(), Upstreams::new(vec![up.addr], None)).await;
    for via in BOTH {
        let r = ask(&s, via, "example.test", RecordType::A).await;
        check(&r, ResponseCode::NoError, false, "example.test A");
        assert_eq!(a_records(&r), vec![EXAMPLE]);

        let r = ask(&s, via, "EXAMPLE.test.", RecordType::AAAA).await;
        check(&r, ResponseCode::NoError, false, "example.test AAAA");
        assert!(matches!(&r.answers[..], [rec] if rec.data == RData::AAAA(AAAA(EXAMPLE6))));

        let r = ask(&s, via, "alias.test", RecordType::A).await;
        check(&r, ResponseCode::NoError, false, "alias.test");
        assert_eq!(r.answers.len(), 2, "{r:?}");
        assert!(r
            .answers
            .iter()
            .any(|rec| rec.record_type() == RecordType::CNAME));
        assert_eq!(a_records(&r), vec![EXAMPLE]);

        let r = ask(&s, via, "mail.test", RecordType::MX).await;
        let mx = r.answers.iter().find_map(|rec| match &rec.data {
            RData::MX(mx) => Some(mx.exchange.clone()),
            _ => None,
        });
        assert_eq!(mx, Some(name("example.test.")));

        let r = ask(&s, via, "text.test", RecordType::TXT).await;
        assert!(
            matches!(&r.answers[..], [rec] if rec.data.to_string().contains("hello upstream")),
            "{r:?}"
        );

        let r = ask(&s, via, "nope.test", RecordType::A).await;
        check(&r, ResponseCode::NXDomain, false, "nope.test");
        assert!(r.answers.is_empty());
        assert!(
            r.authorities
                .iter()
                .any(|rec| rec.record_type() == RecordType::SOA),
            "upstream's SOA is relayed: {r:?}"
        );

        let r = ask(&s, via, "example.test", RecordType::MX).await;
        check(&r, ResponseCode::NoError, false, "NODATA");
        assert!(r.answers.is_empty());

        let r = ask(&s, via, "fail.test", RecordType::A).await;
        check(&r, ResponseCode::ServFail, false, "upstream SERVFAIL");
    }

    // Too big for UDP: upstream truncates, the resolver asks again over TCP;
    // a UDP client gets TC, a TCP client everything.
    assert_eq!(up.tcp_hits(), 0);
    let r = ask(&s, Via::Tcp, "big.test", RecordType::TXT).await;
    check(&r, ResponseCode::NoError, false, "big.test over TCP");
    assert_eq!(r.answers.len(), BIG_TXT);
    assert_eq!(up.tcp_hits(), 1);
    let r = ask(&s, Via::Udp, "big.test", RecordType::TXT).await;
    assert!(r.metadata.truncation, "{r:?}");
}

#[tokio::test]
async fn changes_to_the_names_show_at_once() {
    let names = names();
    let s = server(names.clone(), Upstreams::new(vec![], None)).await;
    assert_eq!(
        a_records(&ask(&s, Via::Udp, "web", RecordType::A).await),
        vec![WEB]
    );

    names.rename("a", "web", "www");
    let r = ask(&s, Via::Udp, "web.sb", RecordType::A).await;
    check(&r, ResponseCode::NXDomain, true, "renamed away");
    let r = ask(&s, Via::Tcp, "www.sb", RecordType::A).await;
    assert_eq!(a_records(&r), vec![WEB]);

    names.remove("a", "db");
    let r = ask(&s, Via::Udp, "db", RecordType::A).await;
    check(&r, ResponseCode::NXDomain, true, "removed");

    names.set("a", "fresh", SECRET);
    assert_eq!(
        a_records(&ask(&s, Via::Udp, "fresh", RecordType::A).await),
        vec![SECRET]
    );

    names.remove_user("a");
    let r = ask(&s, Via::Udp, "www", RecordType::A).await;
    check(&r, ResponseCode::NXDomain, true, "user removed");
}

#[tokio::test]
async fn no_or_dead_upstreams_are_servfail() {
    // None configured: SERVFAIL at once.
    let s = server(names(), Upstreams::new(vec![], None)).await;
    let started = Instant::now();
    let r = ask(&s, Via::Udp, "example.test", RecordType::A).await;
    check(&r, ResponseCode::ServFail, false, "no upstreams");
    assert!(started.elapsed() < Duration::from_secs(1));
    // Siblings still answer.
    assert_eq!(
        a_records(&ask(&s, Via::Udp, "web", RecordType::A).await),
        vec![WEB]
    );

    // One that never answers (bound, silent), and one with nothing bound.
    let silent = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let closed = {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap()
    };
    for dead in [silent.local_addr().unwrap(), closed] {
        let upstreams = Upstreams::with_timeout(vec![dead], None, Duration::from_millis(300));
        let s = server(names(), upstreams).await;
        for via in BOTH {
            let started = Instant::now();
            let r = ask(&s, via, "example.test", RecordType::A).await;
            check(&r, ResponseCode::ServFail, false, "dead upstream");
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "{:?}",
                started.elapsed()
            );
        }
    }
}

#[tokio::test]
async fn garbage_does_not_stop_it() {
    let s = server(names(), Upstreams::new(vec![], None)).await;
    let udp = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let mut two_questions = Message::query();
    two_questions.add_query(Query::query(name("web."), RecordType::A));
    two_questions.add_query(Query::query(name("db."), RecordType::A));
    let mut a_response = Message::query();
    a_response.add_query(Query::query(name("web."), RecordType::A));
    let a_response = a_response.into_response();
    let header_only = [0x12, 0x34, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0];
    let noise: Vec<u8> = (0..700u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let datagrams: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff; 11],
        header_only.to_vec(),
        noise.clone(),
        two_questions.to_vec().unwrap(),
        a_response.to_vec().unwrap(),
    ];
    for d in &datagrams {
        udp.send_to(d, s.udp_addr()).await.unwrap();
    }

    // Two questions: FORMERR, with the request's ID.
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    let formerr = loop {
        assert!(Instant::now() < deadline, "no FORMERR for two questions");
        let n = tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut buf))
            .await
            .expect("a reply")
            .unwrap();
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if m.metadata.id == two_questions.metadata.id {
                break m;
            }
        }
    };
    assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);

    // Garbage over TCP: a bad frame, a frame cut short, a hang-up.
    let mut tcp = tokio::net::TcpStream::connect(s.tcp_addr()).await.unwrap();
    let mut frame = (noise.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(&noise);
    frame.extend_from_slice(&[0xff, 0xff, 1, 2, 3]);
    tcp.write_all(&frame).await.unwrap();
    drop(tcp);

    // Still answering, with the right ID, on both.
    let mut query = Message::query();
    query.metadata.id = 0xbeef;
    query.add_query(Query::query(name("web.sb."), RecordType::A));
    udp.send_to(&query.to_vec().unwrap(), s.udp_addr())
        .await
        .unwrap();
    let answer = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut buf))
            .await
            .expect("an answer after the garbage")
            .unwrap();
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if m.metadata.id == 0xbeef {
                break m;
            }
        }
    };
    check(&answer, ResponseCode::NoError, true, "after garbage");
    assert_eq!(a_records(&answer), vec![WEB]);
    assert_eq!(
        a_records(&ask(&s, Via::Tcp, "web", RecordType::A).await),
        vec![WEB]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_queries_at_once() {
    let up = fake_upstream(None).await;
    let s = Arc::new(server(names(), Upstreams::new(vec![up.addr], None)).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.spawn(async move {
            let via = if i % 10 == 0 { Via::Tcp } else { Via::Udp };
            let (q, want) = match i % 3 {
                0 => ("web", WEB),
                1 => ("db.sb", DB),
                _ => ("example.test", EXAMPLE),
            };
            let r = ask(&s, via, q, RecordType::A).await;
            assert_eq!(a_records(&r), vec![want], "{q} over {via:?}");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test]
async fn shutdown_and_drop_close_the_sockets() {
    let s = server(names(), Upstreams::new(vec![], None)).await;
    let (udp, tcp) = (s.udp_addr(), s.tcp_addr());
    s.shutdown().await;
    assert!(tokio::net::TcpStream::connect(tcp).await.is_err());
    std::net::UdpSocket::bind(udp).expect("UDP port free after shutdown");

    let s = server(names(), Upstreams::new(vec![], None)).await;
    let (udp, tcp) = (s.udp_addr(), s.tcp_addr());
    drop(s);
    // Aborted tasks release their sockets on the runtime's next turn.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::UdpSocket::bind(udp).is_err() || std::net::TcpListener::bind(tcp).is_err() {
        assert!(Instant::now() < deadline, "sockets still open after drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn servers_can_be_kept_across_tasks() {
    fn send<T: Send + 'static>() {}
    send::<DnsServer>();
    send::<Arc<DnsNames>>();
    send::<Arc<Upstreams>>();
}

/// The server and the upstream both inside a namespace of the test's own,
/// on its 127.0.0.1: only clients (and a resolver) whose sockets are made in
/// there reach them.
#[tokio::test]
async fn inside_a_namespace() {
    let Some(ns) = TestNetns::create("inside_a_namespace") else {
        return;
    };
    let up = fake_upstream(Some(&ns.0)).await;
    let spawn = |upstreams: Upstreams| {
        DnsServer::spawn(
            (Ipv4Addr::LOCALHOST, 0).into(),
            Some(ns.0.clone()),
            "a".into(),
            names(),
            Arc::new(upstreams),
        )
    };
    let s = spawn(Upstreams::new(vec![up.addr], Some(ns.0.clone())))
        .await
        .unwrap();
    let inside = NetnsRuntime::new(Some(ns.0.clone()));
    for via in BOTH {
        let r = ask_with(inside.clone(), &s, via, "web.sb", RecordType::A).await;
        assert_eq!(a_records(&r), vec![WEB]);
        let r = ask_with(inside.clone(), &s, via, "example.test", RecordType::A).await;
        check(
            &r,
            ResponseCode::NoError,
            false,
            "forwarded inside the namespace",
        );
        assert_eq!(a_records(&r), vec![EXAMPLE]);
    }
    // The resolver's TCP connections are made in there too.
    let r = ask_with(inside.clone(), &s, Via::Tcp, "big.test", RecordType::TXT).await;
    assert_eq!(r.answers.len(), BIG_TXT);
    assert_eq!(up.tcp_hits(), 1);

    // From this test's own namespace there is nothing at that address.
    assert!(tokio::net::TcpStream::connect(s.tcp_addr()).await.is_err());
    // And a resolver whose sockets stay out here cannot reach the upstream.
    let outside = Upstreams::with_timeout(vec![up.addr], None, Duration::from_millis(300));
    let s2 = spawn(outside).await.unwrap();
    let r = ask_with(inside.clone(), &s2, Via::Udp, "example.test", RecordType::A).await;
    check(&r, ResponseCode::ServFail, false, "upstream out of reach");
}
