//! The host's typed client for one agent connection.
//!
//! One [`AgentClient`] holds one multiplexed connection; every method opens
//! its own channel, so calls run concurrently without blocking each other.

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::handshake::{client_hello, HandshakeError};
use crate::message::*;
use crate::mux::{Channel, ChannelReceiver, ChannelSender, Inbound, Mux, MuxConfig, MuxError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Mux(#[from] MuxError),
    /// The agent answered with an error.
    #[error("{0}")]
    Agent(ErrorBody),
    /// The agent sent something this client cannot make sense of.
    #[error("unexpected reply from the agent: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The agent's error code, if the agent answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent(e) => Some(e.code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A connection to one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    mux: Mux,
    hello: HelloOk,
}

impl AgentClient {
    /// Authenticates on `stream` and starts the multiplexer.
    pub async fn connect<S>(mut stream: S, token: &str) -> Result<AgentClient>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let hello = client_hello(&mut stream, token).await?;
        let (r, w) = tokio::io::split(stream);
        Ok(AgentClient {
            mux: Mux::client(r, w, MuxConfig::default()),
            hello,
        })
    }

    pub fn hello(&self) -> &HelloOk {
        &self.hello
    }

    pub fn is_closed(&self) -> bool {
        self.mux.is_closed()
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) {
        self.mux.closed().await
    }

    /// Ends the connection.
    pub fn close(&self) {
        self.mux.shutdown()
    }

    /// Opens a channel for `request`.
    pub fn open(&self, request: &Request) -> Result<Channel> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(self.mux.open(Bytes::from(body))?)
    }

    /// Request → single reply, for operations without streams.
    async fn call<T: DeserializeOwned>(&self, request: &Request) -> Result<T> {
        let mut ch = self.open(request)?;
        loop {
            match ch.receiver.recv().await {
                Some(Inbound::Close(body)) => return parse_outcome(&body),
                Some(Inbound::Error(body)) => return Err(agent_error(&body)),
                Some(_) => continue,
                None => return Err(ch.receiver.end_error().into()),
            }
        }
    }

    /// A bare channel round trip.
    pub async fn ping(&self) -> Result<()> {
        self.call::<serde_json::Value>(&Request::Ping)
            .await
            .map(|_| ())
    }

    /// Runs a command to completion, buffering its output.
    pub async fn exec(&self, mut req: ExecRequest, stdin: Option<Bytes>) -> Result<ExecOutput> {
        req.stdin = stdin.is_some();
        req.detach = false;
        // The pid comes with the exit status.
        req.no_started_event = true;
        let mut stream = self.exec_stream(req).await?;
        if let Some(input) = stdin {
            let sender = stream.sender.clone();
            // Feed stdin concurrently so a command that writes before it
            // reads cannot deadlock against us.
            tokio::spawn(async move {
                if sender.data(input).await.is_ok() {
                    let _ = sender.eof();
                }
            });
        }
        let mut out = ExecOutput::default();
        let mut stdout = BytesMut::new();
        let mut stderr = BytesMut::new();
        loop {
            match stream.next().await? {
                ExecEvent::Started { pid } => out.pid = pid,
                ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                ExecEvent::Exit(status) => {
                    out.pid = status.pid.unwrap_or(out.pid);
                    out.status = status;
                    out.stdout = stdout.freeze();
                    out.stderr = stderr.freeze();
                    return Ok(out);
                }
            }
        }
    }

    /// Starts a command and streams its events.
    pub async fn exec_stream(&self, req: ExecRequest) -> Result<ExecStream> {
        let Channel { sender, receiver } = self.open(&Request::Exec(req))?;
        Ok(ExecStream { sender, receiver })
    }

    /// Starts a command that outlives this connection.
    pub async fn exec_detached(&self, mut req: ExecRequest) -> Result<Detached> {
        req.detach = true;
        req.stdin = false;
        self.call(&Request::Exec(req)).await
    }

    /// Starts a PTY session and attaches to it.
    pub async fn pty(&self, req: PtyRequest) -> Result<PtyStream> {
        PtyStream::start(self.open(&Request::Pty(req))?).await
    }

    /// Attaches to an existing session, replaying from `offset`.
    pub async fn attach(&self, req: AttachRequest) -> Result<PtyStream> {
        PtyStream::start(self.open(&Request::Attach(req))?).await
    }

    pub async fn sessions(&self) -> Result<Vec<SessionInfo>> {
        Ok(self.call::<Sessions>(&Request::Sessions).await?.sessions)
    }

    pub async fn kill_session(&self, id: &str, signal: Option<i32>) -> Result<()> {
        self.call::<serde_json::Value>(&Request::KillSession {
            id: id.into(),
            signal,
        })
        .await
        .map(|_| ())
    }

    /// Starts a file read; the stream yields the file's bytes.
    pub async fn read_file(&self, req: ReadFileRequest) -> Result<FileReader> {
        let Channel {
            sender,
            mut receiver,
        } = self.open(&Request::ReadFile(req))?;
        let info = loop {
            match receiver.recv().await {
                Some(Inbound::Event(body)) => match parse_json::<Event>(&body)? {
                    Event::FileInfo {
                        size,
                        mode,
                        bytes,
                        truncated,
                    } => break (size, mode, bytes.zip(truncated)),
                    other => {
                        return Err(ClientError::Protocol(format!("unexpected event {other:?}")))
                    }
                },
                Some(Inbound::Close(body)) => {
                    parse_outcome::<serde_json::Value>(&body)?;
                    return Err(ClientError::Protocol(
                        "the read ended before it started".into(),
                    ));
                }
                Some(_) => continue,
                None => return Err(receiver.end_error().into()),
            }
        };
        Ok(FileReader {
            _sender: sender,
            receiver,
            size: info.0,
            mode: info.1,
            extent: info.2,
            done: None,
        })
    }

    /// Reads a whole (possibly truncated) file into memory.
    pub async fn read_file_all(&self, req: ReadFileRequest) -> Result<(Bytes, ReadFileDone)> {
        let mut reader = self.read_file(req).await?;
        let mut buf = BytesMut::with_capacity(reader.size.min(16 << 20) as usize);
        while let Some(chunk) = reader.chunk().await? {
            buf.extend_from_slice(&chunk);
        }
        let done = reader
            .done
            .take()
            .ok_or_else(|| ClientError::Protocol("read without a result".into()))?;
        Ok((buf.freeze(), done))
    }

    /// Writes a file atomically from one buffer.
    pub async fn write_file(&self, req: WriteFileRequest, data: Bytes) -> Result<WriteFileDone> {
        let mut w = self.write_file_stream(req)?;
        w.write(data).await?;
        w.finish().await
    }

    /// Starts an atomic file write fed in chunks.
    pub fn write_file_stream(&self, req: WriteFileRequest) -> Result<FileWriter> {
        let Channel { sender, receiver } = self.open(&Request::WriteFile(req))?;
        Ok(FileWriter { sender, receiver })
    }

    pub async fn stat(&self, path: &str) -> Result<FileStat> {
        self.call(&Request::Stat { path: path.into() }).await
    }

    pub async fn list(&self, path: &str, limit: Option<u32>) -> Result<Listing> {
        self.call(&Request::List {
            path: path.into(),
            limit,
        })
        .await
    }

    pub async fn mkdir(&self, path: &str) -> Result<()> {
        self.call::<serde_json::Value>(&Request::Mkdir { path: path.into() })
            .await
            .map(|_| ())
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        self.call::<serde_json::Value>(&Request::Remove {
            path: path.into(),
            recursive,
        })
        .await
        .map(|_| ())
    }

    pub async fn activity(&self) -> Result<Activity> {
        self.call(&Request::Activity).await
    }

    /// The guest's listening TCP ports.
    pub async fn ports(&self) -> Result<Ports> {
        self.call(&Request::Ports).await
    }

    /// Flushes the guest's filesystems.
    pub async fn sync(&self) -> Result<()> {
        self.call::<serde_json::Value>(&Request::Sync)
            .await
            .map(|_| ())
    }

    /// Gives a guest restored from another sandbox's checkpoint a fresh
    /// identity. The token applies to connections opened afterwards.
    pub async fn reidentify(&self, req: ReidentifyRequest) -> Result<ReidentifyDone> {
        self.call(&Request::Reidentify(req)).await
    }

    /// Asks the guest to sync and power off.
    pub async fn shutdown(&self) -> Result<()> {
        self.call::<serde_json::Value>(&Request::Shutdown)
            .await
            .map(|_| ())
    }

    /// Opens a byte stream to `127.0.0.1:port` inside the guest.
    pub async fn forward(&self, port: u16) -> Result<ForwardStream> {
        let Channel {
            sender,
            mut receiver,
        } = self.open(&Request::Forward { port })?;
        loop {
            match receiver.recv().await {
                Some(Inbound::Event(_)) => return Ok(ForwardStream { sender, receiver }),
                Some(Inbound::Close(body)) => {
                    parse_outcome::<serde_json::Value>(&body)?;
                    return Err(ClientError::Protocol(
                        "the forward closed before connecting".into(),
                    ));
                }
                Some(_) => continue,
                None => return Err(receiver.end_error().into()),
            }
        }
    }
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| ClientError::Protocol(format!("{e}: {}", String::from_utf8_lossy(body))))
}

fn agent_error(body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Agent(e),
        Err(_) => ClientError::Protocol(String::from_utf8_lossy(body).into_owned()),
    }
}

/// Parses a final `Close` body into the expected reply type.
pub fn parse_outcome<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    match parse_json::<Outcome>(body)? {
        Outcome::Ok(v) => {
            serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
        }
        Outcome::Error(e) => Err(ClientError::Agent(e)),
    }
}

fn to_json<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// A finished buffered exec.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub pid: u32,
    pub stdout: Bytes,
    pub stderr: Bytes,
    pub status: ExitStatus,
}

impl Default for ExitStatus {
    fn default() -> Self {
        ExitStatus {
            exit_code: -1,
            signal: None,
            timed_out: false,
            pid: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Started { pid: u32 },
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}

/// A running piped exec.
#[derive(Debug)]
pub struct ExecStream {
    pub sender: ChannelSender,
    receiver: ChannelReceiver,
}

impl ExecStream {
    /// The next event; after `Exit` the stream is done.
    pub async fn next(&mut self) -> Result<ExecEvent> {
        loop {
            match self.receiver.recv().await {
                Some(Inbound::Data(b)) => return Ok(ExecEvent::Stdout(b)),
                Some(Inbound::Stderr(b)) => return Ok(ExecEvent::Stderr(b)),
                Some(Inbound::Event(body)) => {
                    if let Event::Started { pid } = parse_json::<Event>(&body)? {
                        return Ok(ExecEvent::Started { pid });
                    }
                }
                Some(Inbound::Close(body)) => return parse_outcome(&body).map(ExecEvent::Exit),
                Some(Inbound::Error(body)) => {
                    tracing::warn!("agent: {}", String::from_utf8_lossy(&body))
                }
                Some(Inbound::Eof | Inbound::Control(_)) => {}
                None => return Err(self.receiver.end_error().into()),
            }
        }
    }

    pub async fn write_stdin(&self, data: Bytes) -> Result<()> {
        Ok(self.sender.data(data).await?)
    }

    pub fn close_stdin(&self) -> Result<()> {
        Ok(self.sender.eof()?)
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        Ok(self.sender.control(to_json(&Control::Signal { signal }))?)
    }

    /// Kills the command (its whole process group); `next` then yields its exit.
    pub fn cancel(&self) -> Result<()> {
        Ok(self.sender.cancel()?)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    Output(Bytes),
    /// Standard error output of a piped session (at the stream's current
    /// offset, like `Output`; the two share one offset space).
    Stderr(Bytes),
    /// This stream fell behind the scrollback; the output in the gap is
    /// lost to it and the next output starts at `gap.to`.
    Gap(Gap),
    End(PtyEnd),
}

/// A channel attached to a PTY session.
#[derive(Debug)]
pub struct PtyStream {
    pub session: String,
    pub pid: u32,
    /// Offset of the first output byte this stream delivers.
    pub start_offset: u64,
    /// Output that was asked for but is no longer held.
    pub gap: Option<Gap>,
    /// Offset of the next byte `next` will deliver.
    pub offset: u64,
    pub sender: ChannelSender,
    receiver: ChannelReceiver,
}

impl PtyStream {
    async fn start(ch: Channel) -> Result<PtyStream> {
        let Channel {
            sender,
            mut receiver,
        } = ch;
        loop {
            match receiver.recv().await {
                Some(Inbound::Event(body)) => {
                    if let Event::Attached {
                        session,
                        pid,
                        offset,
                        gap,
                    } = parse_json::<Event>(&body)?
                    {
                        return Ok(PtyStream {
                            session,
                            pid,
                            start_offset: offset,
                            gap,
                            offset,
                            sender,
                            receiver,
                        });
                    }
                }
                Some(Inbound::Close(body)) => {
                    parse_outcome::<serde_json::Value>(&body)?;
                    return Err(ClientError::Protocol(
                        "the session ended before attaching".into(),
                    ));
                }
                Some(_) => continue,
                None => return Err(receiver.end_error().into()),
            }
        }
    }

    pub async fn next(&mut self) -> Result<PtyEvent> {
        loop {
            match self.receiver.recv().await {
                Some(Inbound::Data(b)) => {
                    self.offset += b.len() as u64;
                    return Ok(PtyEvent::Output(b));
                }
                Some(Inbound::Stderr(b)) => {
                    self.offset += b.len() as u64;
                    return Ok(PtyEvent::Stderr(b));
                }
                Some(Inbound::Close(body)) => return parse_outcome(&body).map(PtyEvent::End),
                Some(Inbound::Event(body)) => {
                    if let Ok(Event::Gap { from, to }) = parse_json::<Event>(&body) {
                        self.offset = to;
                        return Ok(PtyEvent::Gap(Gap { from, to }));
                    }
                }
                Some(Inbound::Error(body)) => {
                    tracing::warn!("agent: {}", String::from_utf8_lossy(&body))
                }
                Some(_) => {}
                None => return Err(self.receiver.end_error().into()),
            }
        }
    }

    pub async fn write(&self, input: Bytes) -> Result<()> {
        Ok(self.sender.data(input).await?)
    }

    /// Closes a piped session's stdin (the command sees end of input).
    pub fn close_stdin(&self) -> Result<()> {
        Ok(self.sender.eof()?)
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        Ok(self
            .sender
            .control(to_json(&Control::Resize { rows, cols }))?)
    }

    /// Detaches, leaving the session running; returns how it ended for us.
    pub async fn detach(mut self) -> Result<PtyEnd> {
        self.sender.cancel()?;
        loop {
            match self.next().await? {
                PtyEvent::Output(_) | PtyEvent::Stderr(_) | PtyEvent::Gap(_) => {}
                PtyEvent::End(end) => return Ok(end),
            }
        }
    }
}

/// A streaming file read.
#[derive(Debug)]
pub struct FileReader {
    _sender: ChannelSender,
    receiver: ChannelReceiver,
    /// Size of the whole file.
    pub size: u64,
    pub mode: u32,
    /// The bytes that will follow and whether the read is truncated, when
    /// the agent announced them (see `Event::FileInfo`).
    pub extent: Option<(u64, bool)>,
    done: Option<ReadFileDone>,
}

impl FileReader {
    /// The next chunk, or `None` at the end (then see [`FileReader::result`]).
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        if self.done.is_some() {
            return Ok(None);
        }
        loop {
            match self.receiver.recv().await {
                Some(Inbound::Data(b)) => return Ok(Some(b)),
                Some(Inbound::Close(body)) => {
                    self.done = Some(parse_outcome(&body)?);
                    return Ok(None);
                }
                Some(_) => {}
                None => return Err(self.receiver.end_error().into()),
            }
        }
    }

    /// The read's summary, once `chunk` returned `None`.
    pub fn result(&self) -> Option<&ReadFileDone> {
        self.done.as_ref()
    }
}

/// A streaming atomic file write.
#[derive(Debug)]
pub struct FileWriter {
    sender: ChannelSender,
    receiver: ChannelReceiver,
}

impl FileWriter {
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        if let Err(e) = self.sender.data(data).await {
            // The agent may have failed the write already: prefer its reason.
            return Err(self.early_error().await.unwrap_or(e.into()));
        }
        Ok(())
    }

    async fn early_error(&mut self) -> Option<ClientError> {
        match self.receiver.recv().await {
            Some(Inbound::Close(body)) => parse_outcome::<serde_json::Value>(&body).err(),
            _ => None,
        }
    }

    /// Commits the file (fsync + rename in the guest).
    pub async fn finish(mut self) -> Result<WriteFileDone> {
        self.sender.eof()?;
        loop {
            match self.receiver.recv().await {
                Some(Inbound::Close(body)) => return parse_outcome(&body),
                Some(_) => {}
                None => return Err(self.receiver.end_error().into()),
            }
        }
    }
}

/// A byte stream to a guest TCP port.
#[derive(Debug)]
pub struct ForwardStream {
    pub sender: ChannelSender,
    pub receiver: ChannelReceiver,
}

impl ForwardStream {
    /// Bytes from the guest; `None` once the guest side half-closed or the
    /// forward ended.
    pub async fn read(&mut self) -> Result<Option<Bytes>> {
        loop {
            match self.receiver.recv().await {
                Some(Inbound::Data(b)) => return Ok(Some(b)),
                Some(Inbound::Eof) => return Ok(None),
                Some(Inbound::Close(body)) => {
                    parse_outcome::<serde_json::Value>(&body)?;
                    return Ok(None);
                }
                Some(_) => {}
                None => return Err(self.receiver.end_error().into()),
            }
        }
    }

    pub async fn write(&self, data: Bytes) -> Result<()> {
        Ok(self.sender.data(data).await?)
    }

    /// Half-closes our direction.
    pub fn shutdown_write(&self) -> Result<()> {
        Ok(self.sender.eof()?)
    }
}
