//! A minimal QMP client: one unix socket connection, newline-delimited JSON.
//!
//! On connect QEMU sends a greeting; we answer `qmp_capabilities`, then each
//! command goes out as `{"execute": …, "arguments": …, "id": n}` and the
//! reply with the same id is awaited. Asynchronous events (lines with an
//! `event` key) arriving in between are logged and skipped.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LinesCodec};

use crate::{Result, VmmError};

/// Longest QMP line accepted (replies here are small; this bounds memory).
const MAX_LINE: usize = 4 << 20;

/// Time allowed for one command's reply.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Qmp {
    framed: Framed<UnixStream, LinesCodec>,
    next_id: u64,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> VmmError {
    VmmError::io(
        format!("QMP {what}"),
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, e.to_string()),
    )
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let fut = async {
            // QEMU creates the socket file at bind() and accepts only after
            // listen(): a connect in between is refused, so retry that (the
            // timeout below bounds it).
            let stream = loop {
                match UnixStream::connect(path).await {
                    Ok(s) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tokio::time::sleep(Duration::from_millis(2)).await
                    }
                    Err(e) => {
                        return Err(VmmError::io(
                            format!("connecting to QMP at {}", path.display()),
                            e,
                        ))
                    }
                }
            };
            let mut qmp = Qmp {
                framed: Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE)),
                next_id: 1,
            };
            let greeting = qmp.read_json().await?;
            if greeting.get("QMP").is_none() {
                return Err(io_err(
                    "greeting",
                    format!("unexpected greeting {greeting}"),
                ));
            }
            qmp.execute("qmp_capabilities", None).await?;
            Ok(qmp)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| VmmError::Timeout(timeout, format!("QMP at {}", path.display())))?
    }

    async fn read_json(&mut self) -> Result<Value> {
        match self.framed.next().await {
            Some(Ok(line)) => serde_json::from_str(&line)
                .map_err(|e| io_err("read", format!("bad JSON {line:?}: {e}"))),
            Some(Err(e)) => Err(io_err("read", e)),
            None => Err(io_err("read", "connection closed by QEMU")),
        }
    }

    fn command(&mut self, cmd: &str, args: Option<Value>) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        (id, msg.to_string())
    }

    /// Runs `cmd` and returns its `return` value.
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let (id, line) = self.command(cmd, args);
        self.framed
            .send(line)
            .await
            .map_err(|e| io_err("write", e))?;
        self.reply(cmd, id).await
    }

    /// Runs `getfd` passing `fd` along (SCM_RIGHTS), naming it `name` in
    /// QEMU's monitor for a later `fd:<name>` migration URI.
    pub async fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        let (id, mut line) = self.command("getfd", Some(json!({ "fdname": name })));
        line.push('\n');
        // Nothing is buffered in the codec's write buffer between commands
        // (every send flushes), so writing to the socket directly keeps order.
        let stream = self.framed.get_ref();
        let raw = stream.as_raw_fd();
        let bytes = line.as_bytes();
        let mut sent = 0;
        while sent == 0 {
            stream.writable().await.map_err(|e| io_err("write", e))?;
            match stream.try_io(Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(bytes)];
                let fds = [fd.as_raw_fd()];
                let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                nix::sys::socket::sendmsg::<nix::sys::socket::UnixAddr>(
                    raw,
                    &iov,
                    &cmsg,
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            }) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(io_err("sendmsg", e)),
            }
        }
        if sent < bytes.len() {
            use tokio::io::AsyncWriteExt;
            self.framed
                .get_mut()
                .write_all(&bytes[sent..])
                .await
                .map_err(|e| io_err("write", e))?;
        }
        self.reply("getfd", id).await.map(|_| ())
    }

    async fn reply(&mut self, cmd: &str, id: u64) -> Result<Value> {
        loop {
            let msg = self.read_json().await?;
            if let Some(ev) = msg.get("event") {
                let data = msg.get("data").cloned().unwrap_or(Value::Null);
                tracing::debug!(event = %ev, %data, "QMP event");
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                tracing::debug!(%msg, "QMP reply for another command");
                continue;
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                let class = e.get("class").and_then(Value::as_str).unwrap_or("Error");
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("");
                return Err(VmmError::Api {
                    what: cmd.to_owned(),
                    message: format!("{class}: {desc}"),
                });
            }
            return Err(io_err("read", format!("unexpected reply {msg}")));
        }
    }
}
