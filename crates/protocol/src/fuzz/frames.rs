//! Target `frames`: byte streams from a peer through the frame decoder (fed
//! whole, in random pieces and a byte at a time), the handshake reader, and
//! each frame's payload through the parser of its kind.
//!
//! Asserted: the decoder never panics, never errs (every byte sequence
//! decodes), yields the same frames however the stream is split, never a
//! payload above the limit, and never allocates more than the limit plus
//! the input; every decoded frame re-encodes to the bytes it came from.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use super::gen::{self, Rng};
use super::Target;
use crate::frame::{encode_into, Decoded, FrameCodec, FrameKind, HEADER_LEN, MAX_PAYLOAD};
use crate::handshake::{parse_hello, read_frame, MAX_HANDSHAKE_PAYLOAD};
use crate::{Control, ErrorBody, Event, HelloOk, Outcome, Request};

/// Payload limits the decoder is run with (the real one and small ones
/// that make the oversize path common).
const LIMITS: [usize; 3] = [MAX_PAYLOAD, 4096, 16];

pub struct Frames {
    rt: tokio::runtime::Runtime,
}

impl Default for Frames {
    fn default() -> Self {
        Frames {
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime"),
        }
    }
}

/// FNV-1a: derives the split points and the limit from the input itself,
/// so a reproducer is just the bytes.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn kind_byte(rng: &mut Rng) -> u8 {
    if rng.one_in(8) {
        rng.next_u64() as u8
    } else {
        1 + rng.below(13) as u8
    }
}

fn payload(rng: &mut Rng, kind: u8) -> Vec<u8> {
    match rng.below(6) {
        0 => rng.bytes_upto(64),
        1 if kind == 7 => {
            let n = *rng.pick(&[0, 3, 4, 4, 4, 5]);
            rng.bytes(n)
        }
        _ => {
            let mut p = serde_json::to_vec(&gen::body_for(rng, kind)).unwrap_or_default();
            if rng.one_in(3) {
                gen::mutate(rng, &mut p);
            }
            p
        }
    }
}

fn header(out: &mut Vec<u8>, len: u32, channel: u32, kind: u8) {
    out.put_u32(len);
    out.put_u32(channel);
    out.put_u8(kind);
}

/// A stream of frames, some valid, some lying about their length.
fn stream(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.index(6) + 1 {
        let kind = kind_byte(rng);
        let channel = match rng.below(4) {
            0 => 0,
            1 => u32::MAX - rng.below(2) as u32,
            _ => rng.below(8) as u32,
        };
        let body = payload(rng, kind);
        match rng.below(10) {
            // A huge length, followed by some of its bytes.
            0 => {
                let len = match rng.below(3) {
                    0 => u32::MAX,
                    1 => (MAX_PAYLOAD + 1) as u32,
                    _ => (MAX_PAYLOAD as u32).saturating_add(rng.next_u64() as u32),
                };
                header(&mut out, len, channel, kind);
                out.extend_from_slice(&body);
            }
            // A length past the end: the stream is truncated.
            1 => {
                header(
                    &mut out,
                    body.len() as u32 + 1 + rng.below(100) as u32,
                    channel,
                    kind,
                );
                out.extend_from_slice(&body);
            }
            // Raw garbage between frames.
            2 => out.extend(rng.bytes_upto(20)),
            // Just under / at the small limits.
            3 => {
                let len = *rng.pick(&[15usize, 16, 17, 4095, 4096, 4097]);
                header(&mut out, len as u32, channel, kind);
                out.extend(rng.bytes(len));
            }
            _ => {
                header(&mut out, body.len() as u32, channel, kind);
                out.extend_from_slice(&body);
            }
        }
    }
    if rng.one_in(4) {
        gen::mutate(rng, &mut out);
    }
    out
}

/// Decodes `data` handed over in `pieces`; returns the decoded items and
/// the bytes still buffered.
fn decode_in(data: &[u8], pieces: &[usize], max: usize) -> Vec<Decoded> {
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    for &n in pieces.iter().chain(std::iter::once(&usize::MAX)) {
        let end = at + n.min(data.len() - at);
        buf.extend_from_slice(&data[at..end]);
        at = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(d)) => {
                    match &d {
                        Decoded::Frame(f) => assert!(f.payload.len() <= max, "payload over limit"),
                        Decoded::Oversized { len, .. } => {
                            assert!(*len as usize > max, "oversized under limit")
                        }
                    }
                    out.push(d);
                }
                Ok(None) => break,
                Err(e) => panic!("decode error on any byte sequence: {e}"),
            }
        }
        assert!(
            buf.capacity() <= 2 * (data.len() + HEADER_LEN + max) + 64,
            "decoder buffer grew to {} bytes",
            buf.capacity()
        );
        if at == data.len() {
            break;
        }
    }
    out
}

/// Runs the parser each kind of payload meets in the mux, client or agent.
fn parse_payload(kind: FrameKind, payload: &Bytes) {
    match kind {
        FrameKind::Hello => {
            let _ = parse_hello(kind, payload);
        }
        FrameKind::HelloOk => {
            let _ = serde_json::from_slice::<HelloOk>(payload);
        }
        FrameKind::Open => {
            if let Ok(r) = serde_json::from_slice::<Request>(payload) {
                // What parses re-serializes and parses to the same value.
                let again = serde_json::to_vec(&r).expect("serialize a parsed request");
                let back: Request = serde_json::from_slice(&again).expect("reparse a request");
                assert_eq!(back, r, "request round trip");
            }
        }
        FrameKind::Control => {
            let _ = serde_json::from_slice::<Control>(payload);
        }
        FrameKind::Event => {
            let _ = serde_json::from_slice::<Event>(payload);
        }
        FrameKind::Close => {
            let _ = crate::client::parse_outcome::<serde_json::Value>(payload);
            let _ = serde_json::from_slice::<Outcome>(payload);
        }
        FrameKind::Error => {
            let _ = serde_json::from_slice::<ErrorBody>(payload);
        }
        _ => {}
    }
}

impl Target for Frames {
    fn name(&self) -> &'static str {
        "frames"
    }

    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        if rng.one_in(16) {
            rng.bytes_upto(256)
        } else {
            stream(rng)
        }
    }

    fn run(&mut self, input: &[u8]) {
        let h = fnv(input);
        let max = LIMITS[(h % 3) as usize];
        let whole = decode_in(input, &[], max);
        let mut rng = Rng::new(h);
        let pieces: Vec<usize> = (0..input.len()).map(|_| 1 + rng.index(64)).collect();
        assert_eq!(
            decode_in(input, &pieces, max),
            whole,
            "split changed the frames"
        );
        if input.len() <= 256 {
            let bytes = vec![1; input.len()];
            assert_eq!(
                decode_in(input, &bytes, max),
                whole,
                "byte-wise decode differs"
            );
        }
        for d in &whole {
            if let Decoded::Frame(f) = d {
                parse_payload(f.kind, &f.payload);
                let mut re = BytesMut::new();
                encode_into(f, &mut re, max).expect("a decoded frame re-encodes");
                let mut codec = FrameCodec::new(max);
                assert_eq!(
                    codec.decode(&mut re).expect("decode"),
                    Some(d.clone()),
                    "re-encoded frame differs"
                );
            }
        }
        // The agent's handshake reader on the same bytes.
        let mut reader = input;
        let _ = self
            .rt
            .block_on(read_frame(&mut reader, MAX_HANDSHAKE_PAYLOAD));
    }

    fn alloc_limit(&self, input: &[u8]) -> usize {
        // Buffers may double past what they hold; parsing copies at most
        // a payload a few times over. Gigabytes are far beyond.
        4 * (input.len() + HEADER_LEN + MAX_PAYLOAD) + 64 * 1024
    }
}
