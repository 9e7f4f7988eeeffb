//! Input generation: a seeded PRNG, hostile values, message-shaped JSON and
//! byte-level mutations.

use serde_json::{json, Map, Value};

/// SplitMix64: tiny, fast and good enough to drive a fuzzer.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// Up to `n - 1` random bytes.
    pub fn bytes_upto(&mut self, n: usize) -> Vec<u8> {
        let len = self.index(n);
        self.bytes(len)
    }

    /// An integer near an edge (0, 1, powers of two, type limits) or random.
    pub fn edgy_u64(&mut self) -> u64 {
        match self.below(6) {
            0 => *self.pick(&[0, 1, 2, u64::MAX, u64::MAX - 1, i64::MAX as u64]),
            1 => 1u64 << self.below(64),
            2 => (1u64 << self.below(64)).wrapping_sub(1),
            3 => u32::MAX as u64 + self.below(3) - 1,
            4 => self.below(100),
            _ => self.next_u64(),
        }
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Decodes [`hex`]'s output (for reproducers).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A path a hostile or broken client might send.
pub fn path(rng: &mut Rng) -> String {
    const PARTS: &[&str] = &[
        "", "/", "..", ".", "a", "tmp", "etc", "passwd", "proc", "self", "dev", "null", "\0",
        "a\0b", "~", "-", " ", "\n", "é", "🦀", "//", "x.txt", "...", "\u{202e}",
    ];
    match rng.below(8) {
        0 => String::new(),
        1 => "/".repeat(1 + rng.index(5)),
        2 => format!("/{}", "a".repeat(rng.index(5000))),
        3 => "/..".repeat(1 + rng.index(40)),
        4 => String::from_utf8_lossy(&rng.bytes_upto(40)).into_owned(),
        _ => {
            let mut p = String::new();
            if !rng.one_in(5) {
                p.push('/');
            }
            for i in 0..1 + rng.index(6) {
                if i > 0 {
                    p.push('/');
                }
                p.push_str(rng.pick::<&str>(PARTS));
            }
            p
        }
    }
}

/// A short string with hostile characters.
pub fn text(rng: &mut Rng) -> String {
    const WORDS: &[&str] = &[
        "",
        "sh",
        "-c",
        "true",
        "A",
        "PATH",
        "=",
        "A=B",
        "\0",
        "x\0",
        "é",
        "$(id)",
        "'",
        "\"",
        "\\",
        "\u{0}\u{1}",
        "LD_PRELOAD",
        "HOME",
    ];
    match rng.below(6) {
        0 => "x".repeat(rng.index(3000)),
        1 => String::from_utf8_lossy(&rng.bytes_upto(16)).into_owned(),
        _ => {
            let mut s = String::new();
            for _ in 0..rng.index(3) + 1 {
                s.push_str(rng.pick::<&str>(WORDS));
            }
            s
        }
    }
}

/// Any JSON value (used to put the wrong type in a field).
pub fn any_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.one_in(2)),
        2 => json!(rng.edgy_u64()),
        3 => json!(-(rng.below(1 << 40) as i64)),
        4 => Value::from(f64::from_bits(rng.next_u64())),
        5 => Value::String(text(rng)),
        6 => Value::Array(
            (0..rng.index(4))
                .map(|_| any_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.index(4) {
                m.insert(text(rng), any_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

fn env(rng: &mut Rng) -> Value {
    let mut m = Map::new();
    for _ in 0..rng.index(4) {
        m.insert(text(rng), Value::String(text(rng)));
    }
    Value::Object(m)
}

fn argv(rng: &mut Rng) -> Value {
    Value::Array((0..rng.index(4)).map(|_| json!(text(rng))).collect())
}

fn opt_u64(rng: &mut Rng) -> Value {
    if rng.one_in(3) {
        Value::Null
    } else {
        json!(rng.edgy_u64())
    }
}

/// A JSON `Request` (the body of an `Open` frame): every op, with edge and
/// hostile values, sometimes a field of the wrong type or an unknown field.
pub fn request(rng: &mut Rng) -> Value {
    let mut v = match rng.below(19) {
        0 => json!({"op": "ping"}),
        1 => json!({"op": "exec", "argv": argv(rng), "env": env(rng), "cwd": path(rng),
                    "stdin": rng.one_in(2), "timeout_ms": opt_u64(rng), "detach": rng.one_in(2),
                    "output_file": path(rng), "no_started_event": rng.one_in(2)}),
        2 => json!({"op": "pty", "argv": argv(rng), "env": env(rng), "cwd": path(rng),
                    "rows": rng.edgy_u64() % 70000, "cols": rng.edgy_u64() % 70000, "piped": rng.one_in(2)}),
        3 => json!({"op": "attach", "session": text(rng), "offset": opt_u64(rng)}),
        4 => json!({"op": "sessions"}),
        5 => json!({"op": "kill_session", "id": text(rng), "signal": rng.edgy_u64() as i64 as i32}),
        6 => json!({"op": "read_file", "path": path(rng), "offset": opt_u64(rng),
                    "limit": opt_u64(rng), "max_bytes": opt_u64(rng)}),
        7 => {
            json!({"op": "write_file", "path": path(rng), "mode": rng.edgy_u64() as u32, "place": rng.one_in(2)})
        }
        8 => json!({"op": "stat", "path": path(rng)}),
        9 => json!({"op": "list", "path": path(rng), "limit": rng.edgy_u64() as u32}),
        10 => json!({"op": "mkdir", "path": path(rng)}),
        11 => json!({"op": "remove", "path": path(rng), "recursive": rng.one_in(2)}),
        12 => json!({"op": "forward", "port": rng.edgy_u64() % 70000}),
        13 => json!({"op": *rng.pick(&["activity", "ports", "sync", "shutdown", "nope", ""])}),
        14 => json!({"op": "reidentify", "token": text(rng), "hostname": text(rng),
                     "sandbox_id": text(rng), "mac": text(rng), "address": text(rng),
                     "gateway": *rng.pick(&["10.0.0.1", "300.1.1.1", "", "::1"]),
                     "entropy": text(rng), "env": env(rng)}),
        15 => any_value(rng, 0),
        16 => json!({"op": "reidentify", "token": "t", "hostname": "h", "sandbox_id": "s",
                     "mac": *rng.pick(&["aa:bb:cc:dd:ee:ff", "aa:bb", "zz:zz:zz:zz:zz:zz", "aa:bb:cc:dd:ee:ff:00", ":::::"]),
                     "address": *rng.pick(&["10.0.0.2/24", "10.0.0.2/33", "10.0.0.2", "/", "1.2.3.4/-1", "1.2.3.4/255"]),
                     "entropy": *rng.pick(&["", "0", "00", "zz", "0123456789abcdef", "ü0"])}),
        17 => {
            json!({"op": "read_file", "path": "/f", "offset": rng.below(5), "limit": rng.below(5), "max_bytes": rng.below(50)})
        }
        _ => json!({"op": "write_file", "path": "/home/lohar/../x", "place": true}),
    };
    if let Value::Object(m) = &mut v {
        if rng.one_in(8) && !m.is_empty() {
            // A field of the wrong type.
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = rng.pick(&keys).clone();
            m.insert(k, any_value(rng, 0));
        }
        if rng.one_in(16) {
            m.insert(text(rng), any_value(rng, 0));
        }
        if rng.one_in(16) {
            let keys: Vec<String> = m.keys().cloned().collect();
            if let Some(k) = keys.get(rng.index(keys.len().max(1))) {
                m.remove(k);
            }
        }
    }
    v
}

/// A JSON `Control` body.
pub fn control(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 => json!({"type": "resize", "rows": rng.edgy_u64() % 70000, "cols": rng.edgy_u64()}),
        1 => json!({"type": "signal", "signal": rng.edgy_u64() as i64 as i32}),
        2 => json!({"type": text(rng)}),
        _ => any_value(rng, 0),
    }
}

/// A JSON body for a frame of `kind` (agent or client side).
pub fn body_for(rng: &mut Rng, kind: u8) -> Value {
    match kind {
        1 => json!({"version": rng.edgy_u64(), "token": text(rng)}),
        2 => json!({"version": 1, "agent": text(rng), "boot_id": text(rng)}),
        3 => request(rng),
        8 => control(rng),
        9 => json!({"type": *rng.pick(&["started", "attached", "file_info", "connected", "gap"]),
                    "pid": rng.edgy_u64(), "session": text(rng), "offset": rng.edgy_u64(),
                    "size": rng.edgy_u64(), "mode": rng.edgy_u64(), "from": rng.edgy_u64(), "to": rng.edgy_u64()}),
        10 | 13 => match rng.below(3) {
            0 => json!({"ok": any_value(rng, 0)}),
            1 => json!({"error": {"code": text(rng), "message": text(rng)}}),
            _ => {
                json!({"code": *rng.pick(&["bad_request", "not_found", "x"]), "message": text(rng)})
            }
        },
        _ => any_value(rng, 0),
    }
}

/// Applies 1–4 random byte-level mutations.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    const TOKENS: &[&[u8]] = &[
        b"\xff",
        b"\x00",
        b"\"",
        b"\\",
        b"\\u0000",
        b"\\ud800",
        b"99999999999999999999999",
        b"-1",
        b"[",
        b"{",
        b"}",
        b"]",
        b",",
        b":",
        b"null",
        b"1e999",
        b"\xf0\x9f",
    ];
    for _ in 0..1 + rng.index(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.index(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.index(len);
                data[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.index(len + 1);
                let t = rng.pick(TOKENS);
                data.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.index(len);
                let b = (a + 1 + rng.index(16)).min(len);
                data.drain(a..b);
            }
            4 => data.truncate(rng.index(len + 1)),
            5 if len > 0 => {
                let a = rng.index(len);
                let b = (a + 1 + rng.index(32)).min(len);
                let piece = data[a..b].to_vec();
                let at = rng.index(len + 1);
                data.splice(at..at, piece);
            }
            _ => {
                let i = rng.index(len + 1);
                let b = rng.bytes_upto(8);
                data.splice(i..i, b);
            }
        }
    }
}
