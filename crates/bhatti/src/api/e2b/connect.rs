//! The Connect protocol (v1) with the JSON codec, as envd speaks it to the
//! E2B SDKs (https://connectrpc.com/docs/protocol):
//! - unary: `POST /<pkg.Service>/<Method>`, `application/json` both ways,
//!   errors as [`ConnectError`] bodies with a matching HTTP status;
//! - streams: `application/connect+json`, every message in an envelope
//!   `[flags u8][length u32 BE][JSON]`; a server stream always answers 200
//!   and ends with an envelope flagged [`END_STREAM`] holding `{}` or
//!   `{"error": …}`.
//!
//! Message types are serde structs in proto3's JSON mapping (lowerCamelCase
//! names, 64-bit integers as strings, enums by name): written here rather
//! than generated, so the build needs neither protoc nor E2B's `.proto`
//! files in this repository.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::{Code, ConnectError};

/// Flag of the envelope that ends a stream.
pub const END_STREAM: u8 = 0x02;
/// Flag of a compressed envelope (never sent; refused when received).
const COMPRESSED: u8 = 0x01;
/// Largest request message.
pub const MAX_MESSAGE: usize = 4 << 20;

/// A unary request's message (`application/json`).
#[derive(Debug)]
pub struct Unary<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Unary<T> {
    type Rejection = ConnectError;
    async fn from_request(req: Request, _: &S) -> Result<Self, ConnectError> {
        let ct = content_type(req.headers());
        if !(ct.is_empty() || ct == "application/json") {
            return Err(ConnectError::invalid(format!(
                "unary calls take application/json (the JSON codec), not {ct:?}"
            )));
        }
        let bytes = body_bytes(req).await?;
        decode(if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        })
        .map(Unary)
    }
}

/// A server-streaming call's one request message
/// (`application/connect+json`, in one envelope).
#[derive(Debug)]
pub struct StreamRequest<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for StreamRequest<T> {
    type Rejection = Response;
    async fn from_request(req: Request, _: &S) -> Result<Self, Response> {
        let ct = content_type(req.headers());
        if ct != "application/connect+json" {
            return Err(ConnectError::invalid(format!(
                "streaming calls take application/connect+json, not {ct:?}"
            ))
            .into_response());
        }
        let fail = |e: ConnectError| error_stream(e);
        let bytes = body_bytes(req).await.map_err(fail)?;
        let mut d = EnvelopeDecoder::default();
        d.push(&bytes);
        match d.next().map_err(fail)? {
            Some((flags, msg)) if flags & END_STREAM == 0 => {
                decode(&msg).map(StreamRequest).map_err(fail)
            }
            _ => Err(fail(ConnectError::invalid("the request has no message"))),
        }
    }
}

fn content_type(h: &HeaderMap) -> String {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

async fn body_bytes(req: Request) -> Result<Bytes, ConnectError> {
    axum::body::to_bytes(req.into_body(), MAX_MESSAGE)
        .await
        .map_err(|e| {
            ConnectError::invalid(format!(
                "reading the request (at most {MAX_MESSAGE} bytes): {e}"
            ))
        })
}

/// A message from JSON; a bad one is `invalid_argument`.
pub fn decode<T: DeserializeOwned>(json: &[u8]) -> Result<T, ConnectError> {
    serde_json::from_slice(json).map_err(|e| ConnectError::invalid(format!("invalid message: {e}")))
}

/// A unary answer.
pub fn unary<T: Serialize>(r: Result<T, ConnectError>) -> Response {
    match r.and_then(|v| {
        serde_json::to_vec(&v).map_err(|e| ConnectError::internal(format!("encoding: {e}")))
    }) {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// One envelope.
pub fn envelope(flags: u8, json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + json.len());
    b.put_u8(flags);
    b.put_u32(json.len() as u32);
    b.put_slice(json);
    b.freeze()
}

fn end_envelope(err: Option<&ConnectError>) -> Bytes {
    let v = match err {
        Some(e) => serde_json::json!({"error": e.json()}),
        None => serde_json::json!({}),
    };
    envelope(END_STREAM, v.to_string().as_bytes())
}

fn stream_headers() -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/connect+json"),
    )]
}

/// A server stream that fails before its first message.
pub fn error_stream(e: ConnectError) -> Response {
    (StatusCode::OK, stream_headers(), end_envelope(Some(&e))).into_response()
}

/// A server stream of messages; the first error (or the end of `messages`)
/// ends it. Dropping the response (the client went away) drops `messages`.
pub fn server_stream<T, S>(messages: S) -> Response
where
    T: Serialize + Send + 'static,
    S: Stream<Item = Result<T, ConnectError>> + Send + 'static,
{
    let body =
        futures_util::stream::unfold((Box::pin(messages), false), |(mut s, done)| async move {
            if done {
                return None;
            }
            let out = match s.next().await {
                Some(Ok(m)) => match serde_json::to_vec(&m) {
                    Ok(json) => (envelope(0, &json), false),
                    Err(e) => (
                        end_envelope(Some(&ConnectError::internal(format!("encoding: {e}")))),
                        true,
                    ),
                },
                Some(Err(e)) => (end_envelope(Some(&e)), true),
                None => (end_envelope(None), true),
            };
            Some((Ok::<_, std::io::Error>(out.0), (s, out.1)))
        });
    (StatusCode::OK, stream_headers(), Body::from_stream(body)).into_response()
}

/// Incremental envelope reader (client streams arrive in pieces).
#[derive(Debug, Default)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
}

impl EnvelopeDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole envelope `(flags, message)`, if one is buffered;
    /// compressed or oversized envelopes are errors.
    pub fn next(&mut self) -> Result<Option<(u8, Bytes)>, ConnectError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if flags & COMPRESSED != 0 {
            return Err(ConnectError::invalid(
                "compressed messages are not supported",
            ));
        }
        if len > MAX_MESSAGE {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("a message of {len} bytes is over the limit of {MAX_MESSAGE}"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let mut msg = self.buf.split_to(5 + len);
        let msg = msg.split_off(5).freeze();
        Ok(Some((flags, msg)))
    }

    /// Bytes of an unfinished envelope.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The `Keepalive-Ping-Interval` the SDK asks for (seconds), bounded.
pub fn keepalive_interval(h: &HeaderMap) -> Option<Duration> {
    h.get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.clamp(1, 3600)))
}

/// The `Connect-Timeout-Ms` deadline of a call, if any.
pub fn timeout(h: &HeaderMap) -> Option<Duration> {
    h.get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_in_pieces() {
        let a = envelope(0, br#"{"a":1}"#);
        let b = envelope(END_STREAM, b"{}");
        let all = [a.as_ref(), b.as_ref()].concat();
        let mut d = EnvelopeDecoder::default();
        let mut got = Vec::new();
        for byte in all {
            d.push(&[byte]);
            while let Some(m) = d.next().expect("valid") {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (0, Bytes::from_static(br#"{"a":1}"#)));
        assert_eq!(got[1].0, END_STREAM);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn oversized_and_compressed_envelopes_are_refused() {
        let mut d = EnvelopeDecoder::default();
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next().unwrap_err().code, Code::ResourceExhausted);
        let mut d = EnvelopeDecoder::default();
        d.push(&envelope(COMPRESSED, b"{}"));
        assert_eq!(d.next().unwrap_err().code, Code::InvalidArgument);
    }
}
