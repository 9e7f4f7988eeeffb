//! A streaming `multipart/form-data` reader (RFC 7578): parts one after
//! the other, each part's bytes as they arrive. It holds at most one body
//! chunk plus a delimiter's length, and a part's headers up to
//! [`MAX_HEADERS`].

use axum::body::{Body, BodyDataStream};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;

/// Most bytes of one part's headers.
const MAX_HEADERS: usize = 16 << 10;
/// Most bytes of a boundary (RFC 2046: 70).
const MAX_BOUNDARY: usize = 200;

/// The boundary of a `multipart/form-data; boundary=…` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.is_empty() && v.len() <= MAX_BOUNDARY).then(|| v.to_owned())
    })
}

/// One part's headers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Inside the preamble or a part's data.
    Data,
    /// Just after a delimiter: `--` ends the body, CRLF starts a part.
    Delimiter,
    Done,
}

pub struct Multipart {
    body: BodyDataStream,
    buf: BytesMut,
    /// `CRLF--boundary`.
    delim: Vec<u8>,
    state: State,
    eof: bool,
}

type R<T> = Result<T, String>;

impl Multipart {
    pub fn new(body: Body, boundary: &str) -> Multipart {
        let mut buf = BytesMut::new();
        // The first delimiter may open the body without its CRLF.
        buf.extend_from_slice(b"\r\n");
        Multipart {
            body: body.into_data_stream(),
            buf,
            delim: format!("\r\n--{boundary}").into_bytes(),
            state: State::Data,
            eof: false,
        }
    }

    /// More bytes into the buffer; false at the body's end.
    async fn fill(&mut self) -> R<bool> {
        if self.eof {
            return Ok(false);
        }
        match self.body.next().await {
            Some(Ok(b)) => {
                self.buf.extend_from_slice(&b);
                Ok(true)
            }
            Some(Err(e)) => Err(format!("reading the upload: {e}")),
            None => {
                self.eof = true;
                Ok(false)
            }
        }
    }

    /// The next part's headers, or `None` after the last part. The rest of
    /// the current part is skipped.
    pub async fn next_part(&mut self) -> R<Option<Part>> {
        while self.state == State::Data {
            self.chunk().await?;
        }
        if self.state == State::Done {
            return Ok(None);
        }
        while self.buf.len() < 2 {
            if !self.fill().await? {
                return Err("the multipart body ends inside a delimiter".into());
            }
        }
        if self.buf.starts_with(b"--") {
            self.state = State::Done;
            return Ok(None);
        }
        // Transport padding, then CRLF.
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                if !self.buf[..i].iter().all(|b| *b == b' ' || *b == b'\t') {
                    return Err("garbage after a multipart delimiter".into());
                }
                self.buf.advance(i + 2);
                break;
            }
            if self.buf.len() > MAX_HEADERS || !self.fill().await? {
                return Err("a multipart delimiter is not followed by CRLF".into());
            }
        }
        let end = loop {
            if self.buf.starts_with(b"\r\n") {
                break 0;
            }
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 2;
            }
            if self.buf.len() > MAX_HEADERS {
                return Err(format!(
                    "a multipart part's headers are over {MAX_HEADERS} bytes"
                ));
            }
            if !self.fill().await? {
                return Err("the multipart body ends inside a part's headers".into());
            }
        };
        let head = self.buf.split_to(end);
        self.buf.advance(2);
        self.state = State::Data;
        let head = String::from_utf8_lossy(&head);
        let mut part = Part::default();
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("content-disposition") {
                for p in v.split(';').skip(1) {
                    let Some((k, v)) = p.split_once('=') else {
                        continue;
                    };
                    let v = unquote(v.trim());
                    match k.trim().to_ascii_lowercase().as_str() {
                        "name" => part.name = v,
                        "filename" => part.filename = Some(v),
                        _ => {}
                    }
                }
            }
        }
        Ok(Some(part))
    }

    /// The current part's next bytes, or `None` at its end.
    pub async fn chunk(&mut self) -> R<Option<Bytes>> {
        if self.state != State::Data {
            return Ok(None);
        }
        loop {
            if let Some(i) = find(&self.buf, &self.delim) {
                if i > 0 {
                    return Ok(Some(self.buf.split_to(i).freeze()));
                }
                self.buf.advance(self.delim.len());
                self.state = State::Delimiter;
                return Ok(None);
            }
            // All but what could be the start of a delimiter is data.
            let keep = self.delim.len() - 1;
            if self.buf.len() > keep {
                let n = self.buf.len() - keep;
                return Ok(Some(self.buf.split_to(n).freeze()));
            }
            if !self.fill().await? {
                return Err("the multipart body ends inside a part".into());
            }
        }
    }
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(q) => q.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => v.to_owned(),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(body: &'static [u8], piece: usize) -> Vec<(Part, Vec<u8>)> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = body
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let mut m = Multipart::new(body, "XyZ");
        let mut out = Vec::new();
        while let Some(p) = m.next_part().await.expect("valid") {
            let mut data = Vec::new();
            while let Some(c) = m.chunk().await.expect("valid") {
                data.extend_from_slice(&c);
            }
            out.push((p, data));
        }
        out
    }

    #[tokio::test]
    async fn parts_in_any_pieces() {
        let body: &[u8] = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/a b\"\r\nContent-Type: application/octet-stream\r\n\r\nhello\r\n--Xy\r\n\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c\"\r\n\r\n\r\n--XyZ--\r\n";
        for piece in [1, 2, 3, 7, 64, 4096] {
            let got = parse(body, piece).await;
            assert_eq!(got.len(), 2, "piece {piece}");
            assert_eq!(got[0].0.name, "file");
            assert_eq!(got[0].0.filename.as_deref(), Some("/tmp/a b"));
            assert_eq!(got[0].1, b"hello\r\n--Xy\r\n");
            assert_eq!(got[1].0.filename.as_deref(), Some("c"));
            assert_eq!(got[1].1, b"");
        }
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a1\"").as_deref(),
            Some("a1")
        );
        assert_eq!(boundary("multipart/form-data"), None);
    }
}
