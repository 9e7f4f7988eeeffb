//! Answering one query: siblings from the name table, everything else
//! through the upstreams.

use std::future::Future;
use std::iter;
use std::pin::Pin;
use std::sync::Arc;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::net::{DnsError, NetError};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::Semaphore;

use super::names::{DnsNames, Scope};
use super::upstream::Upstreams;

/// TTL of a sibling's A record: short, since sandboxes come and go and
/// their names move.
pub const SIBLING_TTL: u32 = 5;

/// Forwarded queries one server has in flight at most; beyond that a query
/// is answered SERVFAIL at once. Bounds the tasks (and memory) a guest
/// flooding its resolver with unique names can pin.
pub const MAX_FORWARDS: usize = 256;

/// One user's resolver logic.
pub(super) struct Handler {
    user_id: String,
    names: Arc<DnsNames>,
    upstreams: Arc<Upstreams>,
    forwards: Semaphore,
}

/// What to answer, before encoding.
#[derive(Debug)]
struct Reply {
    rcode: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Reply {
    fn code(rcode: ResponseCode, authoritative: bool) -> Reply {
        Reply {
            rcode,
            authoritative,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

impl Handler {
    pub(super) fn new(user_id: String, names: Arc<DnsNames>, upstreams: Arc<Upstreams>) -> Handler {
        Handler {
            user_id,
            names,
            upstreams,
            forwards: Semaphore::new(MAX_FORWARDS),
        }
    }

    async fn respond<R: ResponseHandler>(&self, request: &Request, mut handle: R) -> ResponseInfo {
        // EDNS in, EDNS out, sized to what the client can take (hickory
        // truncates to it and sets TC).
        let mut edns = request.edns.as_ref().map(|req| {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().max(512));
            edns.set_version(0);
            edns
        });
        let reply = match &request.edns {
            Some(req) if req.version() > 0 => Reply::code(ResponseCode::BADVERS, false),
            _ => self.answer(request).await,
        };

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = true;
        metadata.response_code = reply.rcode;
        if let Some(edns) = edns.as_mut() {
            edns.set_rcode_high(reply.rcode.high());
        }
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            iter::empty(),
            reply.additionals.iter(),
        );
        match handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(src = %request.src(), "DNS response not sent: {e}");
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }

    async fn answer(&self, request: &Request) -> Reply {
        if request.metadata.op_code != OpCode::Query {
            return Reply::code(ResponseCode::NotImp, false);
        }
        let Ok(info) = request.request_info() else {
            // Not exactly one question.
            return Reply::code(ResponseCode::FormErr, false);
        };
        let query = info.query;
        let qtype = query.query_type();
        if query.query_class() != DNSClass::IN
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
        {
            return Reply::code(ResponseCode::Refused, false);
        }
        match self.names.scope(&self.user_id, &query.name().to_string()) {
            Scope::Sibling(ip) => {
                let mut reply = Reply::code(ResponseCode::NoError, true);
                // Other types (AAAA above all) get NOERROR with no records:
                // the name exists, and the client moves on at once.
                if matches!(qtype, RecordType::A | RecordType::ANY) {
                    reply.answers.push(Record::from_rdata(
                        query.original().name().clone(),
                        SIBLING_TTL,
                        RData::A(A(ip)),
                    ));
                }
                reply
            }
            Scope::Apex => Reply::code(ResponseCode::NoError, true),
            Scope::Missing => Reply::code(ResponseCode::NXDomain, true),
            Scope::Upstream => self.forward(query.original()).await,
        }
    }

    async fn forward(&self, query: &Query) -> Reply {
        let Ok(_permit) = self.forwards.try_acquire() else {
            tracing::debug!(user = %self.user_id, "too many forwarded DNS queries in flight");
            return Reply::code(ResponseCode::ServFail, false);
        };
        match self
            .upstreams
            .lookup(query.name().clone(), query.query_type())
            .await
        {
            Ok(lookup) => Reply {
                rcode: ResponseCode::NoError,
                authoritative: false,
                answers: lookup.answers().to_vec(),
                authorities: lookup.authorities().to_vec(),
                additionals: lookup.additionals().to_vec(),
            },
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => negative(e),
            Err(e) => {
                tracing::debug!(name = %query.name(), "DNS upstream failed: {e}");
                Reply::code(ResponseCode::ServFail, false)
            }
        }
    }
}

/// NXDOMAIN or NODATA from upstream, with its authority section (the SOA
/// lets the client cache the negative answer as upstream meant).
fn negative(e: NetError) -> Reply {
    let rcode = if e.is_nx_domain() {
        ResponseCode::NXDomain
    } else {
        ResponseCode::NoError
    };
    let mut reply = Reply::code(rcode, false);
    if let NetError::Dns(DnsError::NoRecordsFound(no)) = e {
        match (no.authorities, no.soa) {
            (Some(authorities), _) => reply.authorities = authorities.to_vec(),
            (None, Some(soa)) => reply.authorities.push(soa.into_record_of_rdata()),
            (None, None) => {}
        }
    }
    reply
}

// hickory declares `RequestHandler` with `#[async_trait]`; this is that
// macro's expansion spelled out, so the crate needs no async-trait
// dependency for one impl.
impl RequestHandler for Handler {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.respond(request, response_handle))
    }
}
