//! One connection, many channels, each with its own flow control.
//!
//! The same multiplexer runs on both ends. The client opens channels; the
//! server (the agent) accepts them. A reader task demultiplexes frames into
//! per-channel queues and a writer task batches outgoing frames onto the
//! stream. `Data` and `Stderr` bytes are credit-based: each side may have at
//! most [`INITIAL_WINDOW`] unacknowledged bytes in flight per channel and the
//! receiver grants more (`Window`) only as the application consumes them, so
//! a reader that stops reading one channel stalls only that channel's sender.
//! Queues are unbounded in type but bounded in practice: data by the window,
//! other frames by [`MuxConfig::max_queued_frames`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

use crate::frame::{encode_into, Decoded, Frame, FrameCodec, FrameKind, MAX_CHUNK, MAX_PAYLOAD};
use crate::message::{ErrorBody, ErrorCode, Outcome};

/// Bytes each side may send on a new channel before the first `Window`.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Credit beyond which further `Window` grants are a protocol error.
const MAX_CREDIT: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct MuxConfig {
    /// Channels open at once (server side); more get `limit_reached`.
    pub max_channels: usize,
    /// Non-data frames queued for one channel's application before the
    /// channel is failed as a protocol violation.
    pub max_queued_frames: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            max_channels: 1024,
            max_queued_frames: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// A frame delivered to a channel's application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Data(Bytes),
    Stderr(Bytes),
    Eof,
    Control(Bytes),
    Event(Bytes),
    /// A non-fatal error about a frame this side sent (JSON `ErrorBody`).
    Error(Bytes),
    /// Server: the client cancels. Client: the final outcome (JSON).
    Close(Bytes),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MuxError {
    #[error("the connection to the agent is closed")]
    ConnectionClosed,
    /// This side shut the connection down (its owner ended it on purpose,
    /// e.g. the VM is being stopped), not the peer going away.
    #[error("the connection to the agent was shut down by this side")]
    Shutdown,
    #[error("the channel is closed")]
    ChannelClosed,
    #[error("a message of {0} bytes is over the frame limit")]
    TooLarge(usize),
}

/// Why a connection's reader stopped.
#[derive(Debug)]
pub enum MuxEnd {
    /// The peer closed the stream.
    Eof,
    /// Reading failed.
    Io(std::io::Error),
    /// This side shut the connection down.
    Shutdown,
    /// Server only: a new `Hello` arrived on a stream that has no connection
    /// boundaries (a virtio-serial port after a snapshot restore).
    Rehello(Bytes),
}

struct ChanShared {
    id: u32,
    /// Bytes this side may still send.
    credit: Semaphore,
    /// Bytes the peer may still send before our next grant.
    recv_budget: AtomicI64,
    /// Non-data frames waiting in the application queue.
    queued: AtomicUsize,
    /// Server: our final `Close` went out. Client: the server's arrived.
    finished: AtomicBool,
    /// Client: a cancel `Close` went out.
    cancelled: AtomicBool,
}

struct ChanEntry {
    inbound: mpsc::UnboundedSender<Inbound>,
    shared: Arc<ChanShared>,
}

struct Conn {
    side: Side,
    config: MuxConfig,
    out: mpsc::UnboundedSender<Frame>,
    channels: Mutex<HashMap<u32, ChanEntry>>,
    next_id: AtomicU32,
    closed: watch::Sender<bool>,
    /// Set when the reader saw the peer go (EOF, a read error): bytes not
    /// yet written must not reach whoever comes next on a stream without
    /// connection boundaries (a virtio-serial port, whose next host would
    /// read the rest of an old frame before its `HelloOk`).
    peer_gone: watch::Sender<bool>,
    /// [`Mux::shutdown`] ended it (not the peer, not an error).
    shut_here: AtomicBool,
}

impl Conn {
    fn channels(&self) -> MutexGuard<'_, HashMap<u32, ChanEntry>> {
        // A poisoned map only means a panic elsewhere; the data is still sound.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, frame: Frame) -> Result<(), MuxError> {
        if frame.payload.len() > MAX_PAYLOAD {
            return Err(MuxError::TooLarge(frame.payload.len()));
        }
        self.out.send(frame).map_err(|_| self.end_error())
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Why an operation on the closed connection fails.
    fn end_error(&self) -> MuxError {
        if self.shut_here.load(Ordering::SeqCst) {
            MuxError::Shutdown
        } else {
            MuxError::ConnectionClosed
        }
    }

    fn shut(&self) {
        self.closed.send_replace(true);
        for (_, entry) in self.channels().drain() {
            entry.shared.credit.close();
        }
    }

    /// Ends a channel from this side because of something the peer did.
    fn fail_channel(&self, id: u32, code: ErrorCode, message: String) {
        let entry = self.channels().remove(&id);
        match self.side {
            Side::Server => {
                if let Some(e) = &entry {
                    e.shared.finished.store(true, Ordering::SeqCst);
                    e.shared.credit.close();
                }
                let body = outcome_bytes(&Outcome::Error(ErrorBody::new(code, message)));
                let _ = self.send(Frame::new(id, FrameKind::Close, body));
            }
            Side::Client => {
                if let Some(e) = entry {
                    e.shared.finished.store(true, Ordering::SeqCst);
                    e.shared.credit.close();
                    let body = outcome_bytes(&Outcome::Error(ErrorBody::new(code, message)));
                    let _ = e.inbound.send(Inbound::Close(body));
                }
            }
        }
    }
}

fn outcome_bytes(o: &Outcome) -> Bytes {
    Bytes::from(serde_json::to_vec(o).unwrap_or_default())
}

fn error_bytes(code: ErrorCode, message: impl Into<String>) -> Bytes {
    Bytes::from(serde_json::to_vec(&ErrorBody::new(code, message)).unwrap_or_default())
}

/// Handle to a multiplexed connection. Cheap to clone.
#[derive(Clone)]
pub struct Mux {
    conn: Arc<Conn>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("side", &self.conn.side)
            .field("closed", &self.conn.is_closed())
            .finish()
    }
}

/// Server side: yields channels as the client opens them.
pub struct Acceptor {
    rx: mpsc::Receiver<(Channel, Bytes)>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

impl Acceptor {
    /// The next opened channel and its `Open` payload; `None` once the
    /// connection is gone.
    pub async fn accept(&mut self) -> Option<(Channel, Bytes)> {
        self.rx.recv().await
    }
}

impl Mux {
    /// Starts the client end over a stream whose handshake is done.
    pub fn client<R, W>(reader: R, writer: W, config: MuxConfig) -> Mux
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (mux, _) = Mux::start(Side::Client, reader, writer, config, None);
        mux
    }

    /// Starts the server end. The join handle says why the reader stopped.
    pub fn server<R, W>(
        reader: R,
        writer: W,
        config: MuxConfig,
    ) -> (Mux, Acceptor, JoinHandle<MuxEnd>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(config.max_channels.max(1));
        let (mux, handle) = Mux::start(Side::Server, reader, writer, config, Some(tx));
        (mux, Acceptor { rx }, handle)
    }

    fn start<R, W>(
        side: Side,
        reader: R,
        writer: W,
        config: MuxConfig,
        accept: Option<mpsc::Sender<(Channel, Bytes)>>,
    ) -> (Mux, JoinHandle<MuxEnd>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (closed, _) = watch::channel(false);
        let (peer_gone, _) = watch::channel(false);
        let conn = Arc::new(Conn {
            side,
            config,
            out: out_tx,
            channels: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            closed,
            peer_gone,
            shut_here: AtomicBool::new(false),
        });
        tokio::spawn(write_loop(
            writer,
            out_rx,
            conn.closed.subscribe(),
            conn.peer_gone.subscribe(),
            Arc::downgrade(&conn),
        ));
        let handle = tokio::spawn(read_loop(conn.clone(), reader, accept));
        (Mux { conn }, handle)
    }

    /// Client: opens a channel with a serialized request.
    pub fn open(&self, request: Bytes) -> Result<Channel, MuxError> {
        if self.conn.is_closed() {
            return Err(self.conn.end_error());
        }
        if request.len() > MAX_PAYLOAD {
            return Err(MuxError::TooLarge(request.len()));
        }
        let id = loop {
            let id = self.conn.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !self.conn.channels().contains_key(&id) {
                break id;
            }
        };
        let channel = register(&self.conn, id);
        self.conn.send(Frame::new(id, FrameKind::Open, request))?;
        Ok(channel)
    }

    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        let mut rx = self.conn.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Ends the connection: every channel sees its queue end.
    pub fn shutdown(&self) {
        self.conn.shut_here.store(true, Ordering::SeqCst);
        self.conn.shut();
    }

    /// Channels currently open.
    pub fn open_channels(&self) -> usize {
        self.conn.channels().len()
    }
}

fn register(conn: &Arc<Conn>, id: u32) -> Channel {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(ChanShared {
        id,
        credit: Semaphore::new(INITIAL_WINDOW as usize),
        recv_budget: AtomicI64::new(INITIAL_WINDOW as i64),
        queued: AtomicUsize::new(0),
        finished: AtomicBool::new(false),
        cancelled: AtomicBool::new(false),
    });
    conn.channels().insert(
        id,
        ChanEntry {
            inbound: tx,
            shared: shared.clone(),
        },
    );
    let guard = Arc::new(DropGuard {
        conn: conn.clone(),
        chan: shared.clone(),
    });
    Channel {
        sender: ChannelSender {
            conn: conn.clone(),
            chan: shared.clone(),
            _guard: guard.clone(),
        },
        receiver: ChannelReceiver {
            conn: conn.clone(),
            chan: shared,
            rx,
            consumed: 0,
            _guard: guard,
        },
    }
}

/// Sends the channel's closing frame if the application forgot to: a server
/// handler that ends without a result answers `internal`; a client that
/// drops its channel cancels it.
struct DropGuard {
    conn: Arc<Conn>,
    chan: Arc<ChanShared>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        match self.conn.side {
            Side::Server => {
                if !self.chan.finished.swap(true, Ordering::SeqCst) {
                    self.conn.channels().remove(&self.chan.id);
                    let body = outcome_bytes(&Outcome::Error(ErrorBody::new(
                        ErrorCode::Internal,
                        "the agent ended this channel without a result",
                    )));
                    let _ = self
                        .conn
                        .send(Frame::new(self.chan.id, FrameKind::Close, body));
                }
            }
            Side::Client => {
                if !self.chan.finished.load(Ordering::SeqCst)
                    && !self.chan.cancelled.swap(true, Ordering::SeqCst)
                {
                    let _ = self.conn.send(Frame::empty(self.chan.id, FrameKind::Close));
                }
            }
        }
    }
}

/// Both halves of a channel.
#[derive(Debug)]
pub struct Channel {
    pub sender: ChannelSender,
    pub receiver: ChannelReceiver,
}

impl Channel {
    pub fn id(&self) -> u32 {
        self.sender.chan.id
    }
}

/// Sending half. Clones share the channel's credit.
#[derive(Clone)]
pub struct ChannelSender {
    conn: Arc<Conn>,
    chan: Arc<ChanShared>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for ChannelSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSender")
            .field("id", &self.chan.id)
            .finish()
    }
}

impl ChannelSender {
    pub fn id(&self) -> u32 {
        self.chan.id
    }

    /// Sends bytes as `Data`, waiting for credit as needed.
    pub async fn data(&self, bytes: Bytes) -> Result<(), MuxError> {
        self.credited(FrameKind::Data, bytes).await
    }

    /// Sends bytes as `Stderr` (server only), sharing the data credit.
    pub async fn stderr(&self, bytes: Bytes) -> Result<(), MuxError> {
        self.credited(FrameKind::Stderr, bytes).await
    }

    async fn credited(&self, kind: FrameKind, mut bytes: Bytes) -> Result<(), MuxError> {
        while !bytes.is_empty() {
            let n = bytes.len().min(MAX_CHUNK);
            let permit = self
                .chan
                .credit
                .acquire_many(n as u32)
                .await
                .map_err(|_| self.closed_error())?;
            permit.forget();
            self.conn
                .send(Frame::new(self.chan.id, kind, bytes.split_to(n)))?;
        }
        Ok(())
    }

    /// True when `n` bytes could be sent now without waiting.
    pub fn has_credit(&self, n: usize) -> bool {
        self.chan.credit.available_permits() >= n
    }

    pub fn eof(&self) -> Result<(), MuxError> {
        self.plain(FrameKind::Eof, Bytes::new())
    }

    pub fn control(&self, json: Bytes) -> Result<(), MuxError> {
        self.plain(FrameKind::Control, json)
    }

    pub fn event(&self, json: Bytes) -> Result<(), MuxError> {
        self.plain(FrameKind::Event, json)
    }

    /// A non-fatal error about a frame the peer sent on this channel.
    pub fn error(&self, code: ErrorCode, message: impl Into<String>) -> Result<(), MuxError> {
        self.plain(FrameKind::Error, error_bytes(code, message))
    }

    fn plain(&self, kind: FrameKind, payload: Bytes) -> Result<(), MuxError> {
        if self.chan.finished.load(Ordering::SeqCst) {
            return Err(self.closed_error());
        }
        self.conn.send(Frame::new(self.chan.id, kind, payload))
    }

    fn closed_error(&self) -> MuxError {
        if self.conn.is_closed() {
            self.conn.end_error()
        } else {
            MuxError::ChannelClosed
        }
    }

    /// Server: ends the channel with its outcome (once).
    pub fn close(&self, outcome: &Outcome) -> Result<(), MuxError> {
        debug_assert_eq!(self.conn.side, Side::Server);
        let mut body = outcome_bytes(outcome);
        if body.len() > MAX_PAYLOAD {
            body = outcome_bytes(&Outcome::Error(ErrorBody::new(
                ErrorCode::TooLarge,
                format!("the reply of {} bytes is over the frame limit", body.len()),
            )));
        }
        if self.chan.finished.swap(true, Ordering::SeqCst) {
            return Err(MuxError::ChannelClosed);
        }
        self.conn.channels().remove(&self.chan.id);
        self.chan.credit.close();
        self.conn
            .send(Frame::new(self.chan.id, FrameKind::Close, body))
    }

    /// Client: asks the agent to cancel; its final `Close` still follows.
    pub fn cancel(&self) -> Result<(), MuxError> {
        if self.chan.finished.load(Ordering::SeqCst)
            || self.chan.cancelled.swap(true, Ordering::SeqCst)
        {
            return Ok(());
        }
        self.conn.send(Frame::empty(self.chan.id, FrameKind::Close))
    }

    /// True once the channel's final `Close` went out (server) or came in
    /// (client), or the connection ended.
    pub fn is_finished(&self) -> bool {
        self.chan.finished.load(Ordering::SeqCst) || self.conn.is_closed()
    }
}

/// Receiving half.
pub struct ChannelReceiver {
    conn: Arc<Conn>,
    chan: Arc<ChanShared>,
    rx: mpsc::UnboundedReceiver<Inbound>,
    /// Data consumed since the last grant.
    consumed: u32,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for ChannelReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelReceiver")
            .field("id", &self.chan.id)
            .finish()
    }
}

impl ChannelReceiver {
    /// Why [`Self::recv`] answered `None`: the connection ended (by the
    /// peer, or [`MuxError::Shutdown`] by this side), or the channel.
    pub fn end_error(&self) -> MuxError {
        if self.conn.is_closed() {
            self.conn.end_error()
        } else {
            MuxError::ChannelClosed
        }
    }

    /// The next frame for this channel. `None` means the channel or the
    /// whole connection is gone.
    pub async fn recv(&mut self) -> Option<Inbound> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Self::recv`] for poll-based readers.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Inbound>> {
        let item = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(item) = &item {
            match item {
                Inbound::Data(b) | Inbound::Stderr(b) => self.consumed(b.len()),
                _ => {
                    self.chan.queued.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        std::task::Poll::Ready(item)
    }

    fn consumed(&mut self, n: usize) {
        self.consumed += n as u32;
        if self.consumed >= INITIAL_WINDOW / 4 {
            let grant = std::mem::take(&mut self.consumed);
            // Budget first, so data sent on the new credit is never seen as
            // an overrun.
            self.chan
                .recv_budget
                .fetch_add(grant as i64, Ordering::SeqCst);
            let _ = self.conn.send(Frame::new(
                self.chan.id,
                FrameKind::Window,
                Bytes::copy_from_slice(&grant.to_be_bytes()),
            ));
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    mut closed: watch::Receiver<bool>,
    mut peer_gone: watch::Receiver<bool>,
    conn: std::sync::Weak<Conn>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let frame = tokio::select! {
            biased;
            f = rx.recv() => match f { Some(f) => f, None => break },
            _ = closed.wait_for(|c| *c) => break,
        };
        let push = |f: &Frame, buf: &mut BytesMut| {
            if let Err(e) = encode_into(f, buf, MAX_PAYLOAD) {
                tracing::warn!(channel = f.channel, "dropping unencodable frame: {e}");
            }
        };
        push(&frame, &mut buf);
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(f) => push(&f, &mut buf),
                Err(_) => break,
            }
        }
        let written = tokio::select! {
            biased;
            r = async {
                writer.write_all(&buf).await?;
                writer.flush().await
            } => r.is_ok(),
            // A write waiting for a peer that is gone would otherwise
            // finish into the next peer's stream.
            _ = peer_gone.wait_for(|g| *g) => false,
        };
        if !written {
            break;
        }
        buf.clear();
    }
    let _ = writer.shutdown().await;
    if let Some(conn) = conn.upgrade() {
        conn.shut();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    conn: Arc<Conn>,
    reader: R,
    accept: Option<mpsc::Sender<(Channel, Bytes)>>,
) -> MuxEnd {
    let mut frames = FramedRead::with_capacity(reader, FrameCodec::default(), 128 * 1024);
    let mut closed = conn.closed.subscribe();
    let end = loop {
        let next = tokio::select! {
            biased;
            _ = closed.wait_for(|c| *c) => break MuxEnd::Shutdown,
            n = frames.next() => n,
        };
        match next {
            None => {
                conn.peer_gone.send_replace(true);
                break MuxEnd::Eof;
            }
            Some(Err(crate::frame::CodecError::Io(e))) => {
                conn.peer_gone.send_replace(true);
                break MuxEnd::Io(e);
            }
            // A stream out of step: nothing more of ours belongs on it.
            Some(Err(e)) => {
                conn.peer_gone.send_replace(true);
                break MuxEnd::Io(std::io::Error::other(e.to_string()));
            }
            Some(Ok(Decoded::Oversized { channel, kind, len })) => {
                let msg =
                    format!("{kind:?} frame of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit");
                if channel == 0 {
                    let _ = conn.send(Frame::new(
                        0,
                        FrameKind::Error,
                        error_bytes(ErrorCode::TooLarge, msg),
                    ));
                } else {
                    conn.fail_channel(channel, ErrorCode::TooLarge, msg);
                }
            }
            Some(Ok(Decoded::Frame(frame))) => {
                if let Some(end) = dispatch(&conn, frame, accept.as_ref()) {
                    break end;
                }
            }
        }
    };
    conn.shut();
    end
}

/// Routes one frame. Returns `Some` when the connection must end.
fn dispatch(
    conn: &Arc<Conn>,
    frame: Frame,
    accept: Option<&mpsc::Sender<(Channel, Bytes)>>,
) -> Option<MuxEnd> {
    let Frame {
        channel: id,
        kind,
        payload,
    } = frame;
    if id == 0 {
        match (kind, conn.side) {
            (FrameKind::Ping, _) => {
                let _ = conn.send(Frame::new(0, FrameKind::Pong, payload));
            }
            (FrameKind::Pong, _) => {}
            (FrameKind::Hello, Side::Server) => return Some(MuxEnd::Rehello(payload)),
            (FrameKind::Error, _) => {
                tracing::warn!(
                    "peer reported a connection error: {}",
                    String::from_utf8_lossy(&payload)
                );
            }
            (other, Side::Server) => {
                let msg = format!("unexpected {other:?} frame on channel 0");
                let _ = conn.send(Frame::new(
                    0,
                    FrameKind::Error,
                    error_bytes(ErrorCode::Protocol, msg),
                ));
            }
            (other, Side::Client) => tracing::debug!("ignoring {other:?} frame on channel 0"),
        }
        return None;
    }

    if kind == FrameKind::Open {
        match (conn.side, accept) {
            (Side::Server, Some(accept)) => open_from_peer(conn, id, payload, accept),
            _ => tracing::debug!(channel = id, "ignoring Open sent to a client"),
        }
        return None;
    }

    let Some((inbound, shared)) = conn
        .channels()
        .get(&id)
        .map(|e| (e.inbound.clone(), e.shared.clone()))
    else {
        // Frames racing a channel's end are normal; only an unknown kind
        // deserves an answer.
        if let (FrameKind::Unknown(k), Side::Server) = (kind, conn.side) {
            let _ = conn.send(Frame::new(
                id,
                FrameKind::Error,
                error_bytes(ErrorCode::BadRequest, format!("unknown frame kind {k}")),
            ));
        }
        return None;
    };

    let wrong_direction = match conn.side {
        Side::Server => matches!(
            kind,
            FrameKind::Stderr | FrameKind::Event | FrameKind::HelloOk | FrameKind::Hello
        ),
        Side::Client => matches!(
            kind,
            FrameKind::Control | FrameKind::Hello | FrameKind::HelloOk
        ),
    };
    if wrong_direction {
        conn.fail_channel(
            id,
            ErrorCode::Protocol,
            format!("{kind:?} frames may not be sent this way"),
        );
        return None;
    }

    let item = match kind {
        FrameKind::Data | FrameKind::Stderr => {
            let left = shared
                .recv_budget
                .fetch_sub(payload.len() as i64, Ordering::SeqCst)
                - payload.len() as i64;
            if left < 0 {
                conn.fail_channel(
                    id,
                    ErrorCode::Protocol,
                    "data beyond the flow-control window".into(),
                );
                return None;
            }
            if kind == FrameKind::Data {
                Inbound::Data(payload)
            } else {
                Inbound::Stderr(payload)
            }
        }
        FrameKind::Window => {
            let Ok(raw) = <[u8; 4]>::try_from(payload.as_ref()) else {
                conn.fail_channel(
                    id,
                    ErrorCode::Protocol,
                    "a Window frame carries exactly 4 bytes".into(),
                );
                return None;
            };
            let grant = u32::from_be_bytes(raw) as usize;
            if shared.credit.available_permits() + grant > MAX_CREDIT {
                conn.fail_channel(
                    id,
                    ErrorCode::Protocol,
                    "window grant beyond the credit limit".into(),
                );
            } else {
                shared.credit.add_permits(grant);
            }
            return None;
        }
        FrameKind::Eof => Inbound::Eof,
        FrameKind::Control => Inbound::Control(payload),
        FrameKind::Event => Inbound::Event(payload),
        FrameKind::Error => Inbound::Error(payload),
        FrameKind::Close => {
            if conn.side == Side::Client {
                shared.finished.store(true, Ordering::SeqCst);
                shared.credit.close();
                conn.channels().remove(&id);
            }
            Inbound::Close(payload)
        }
        FrameKind::Unknown(k) => {
            if conn.side == Side::Server {
                let _ = conn.send(Frame::new(
                    id,
                    FrameKind::Error,
                    error_bytes(ErrorCode::BadRequest, format!("unknown frame kind {k}")),
                ));
            }
            return None;
        }
        FrameKind::Open
        | FrameKind::Ping
        | FrameKind::Pong
        | FrameKind::Hello
        | FrameKind::HelloOk => {
            conn.fail_channel(
                id,
                ErrorCode::Protocol,
                format!("{kind:?} is only valid on channel 0"),
            );
            return None;
        }
    };

    let is_data = matches!(item, Inbound::Data(_) | Inbound::Stderr(_));
    if !is_data {
        let queued = shared.queued.fetch_add(1, Ordering::Relaxed) + 1;
        if queued > conn.config.max_queued_frames {
            conn.fail_channel(
                id,
                ErrorCode::Protocol,
                "too many unread control frames".into(),
            );
            return None;
        }
    }
    // A dropped receiver means nobody listens any more; that is fine.
    let _ = inbound.send(item);
    None
}

fn open_from_peer(
    conn: &Arc<Conn>,
    id: u32,
    payload: Bytes,
    accept: &mpsc::Sender<(Channel, Bytes)>,
) {
    let refuse = |code, msg: &str| {
        let body = outcome_bytes(&Outcome::Error(ErrorBody::new(code, msg)));
        let _ = conn.send(Frame::new(id, FrameKind::Close, body));
    };
    let (exists, count) = {
        let map = conn.channels();
        (map.contains_key(&id), map.len())
    };
    if exists {
        let msg = format!("channel {id} is already open");
        let _ = conn.send(Frame::new(
            0,
            FrameKind::Error,
            error_bytes(ErrorCode::Protocol, msg),
        ));
        return;
    }
    if count >= conn.config.max_channels {
        refuse(ErrorCode::LimitReached, "too many open channels");
        return;
    }
    let channel = register(conn, id);
    if let Err(e) = accept.try_send((channel, payload)) {
        // The guard of the dropped channel would answer `internal`; say why.
        let (channel, _) = match e {
            mpsc::error::TrySendError::Full(v) | mpsc::error::TrySendError::Closed(v) => v,
        };
        let _ = channel.sender.close(&Outcome::Error(ErrorBody::new(
            ErrorCode::LimitReached,
            "the agent is not accepting channels",
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A client and a server mux over an in-memory pipe.
    fn pair() -> (Mux, Acceptor) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let client = Mux::client(ar, aw, MuxConfig::default());
        let (_server, acceptor, _) = Mux::server(br, bw, MuxConfig::default());
        (client, acceptor)
    }

    async fn next_close(rx: &mut ChannelReceiver) -> Bytes {
        loop {
            match rx.recv().await.expect("channel alive") {
                Inbound::Close(b) => return b,
                _ => continue,
            }
        }
    }

    #[tokio::test]
    async fn stalled_channel_does_not_block_others() {
        let (client, mut acceptor) = pair();
        // Server: channel "stall" is never read; "echo" answers each Data.
        tokio::spawn(async move {
            let mut keep = Vec::new();
            while let Some((ch, req)) = acceptor.accept().await {
                if &req[..] == b"stall" {
                    keep.push(ch);
                    continue;
                }
                tokio::spawn(async move {
                    let Channel {
                        sender,
                        mut receiver,
                    } = ch;
                    while let Some(item) = receiver.recv().await {
                        if let Inbound::Data(b) = item {
                            sender.data(b).await.unwrap();
                        }
                    }
                });
            }
        });
        let stalled = client.open(Bytes::from_static(b"stall")).unwrap();
        let filler = tokio::spawn(async move {
            // 1 MiB into a channel nobody reads: blocks after the window.
            let _ = stalled.sender.data(Bytes::from(vec![7u8; 1 << 20])).await;
        });
        let mut echo = client.open(Bytes::from_static(b"echo")).unwrap();
        for i in 0..100u32 {
            let msg = Bytes::from(i.to_be_bytes().to_vec());
            echo.sender.data(msg.clone()).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), echo.receiver.recv())
                .await
                .expect("echo must not be blocked by the stalled channel");
            assert_eq!(got, Some(Inbound::Data(msg)));
        }
        assert!(
            !filler.is_finished(),
            "the stalled sender must be waiting for credit"
        );
        filler.abort();
    }

    #[tokio::test]
    async fn window_overrun_fails_the_channel() {
        // A raw peer that ignores flow control.
        let (a, b) = tokio::io::duplex(1 << 22);
        let (br, bw) = tokio::io::split(b);
        let (_server, mut acceptor, _) = Mux::server(br, bw, MuxConfig::default());
        let (mut ar, mut aw) = tokio::io::split(a);
        let mut buf = BytesMut::new();
        encode_into(
            &Frame::new(5, FrameKind::Open, &b"x"[..]),
            &mut buf,
            MAX_PAYLOAD,
        )
        .unwrap();
        for _ in 0..5 {
            encode_into(
                &Frame::new(5, FrameKind::Data, vec![0u8; MAX_CHUNK]),
                &mut buf,
                MAX_PAYLOAD,
            )
            .unwrap();
        }
        aw.write_all(&buf).await.unwrap();
        let (ch, _) = acceptor.accept().await.unwrap();
        let mut frames = FramedRead::new(&mut ar, FrameCodec::default());
        let reply = loop {
            match frames.next().await.unwrap().unwrap() {
                Decoded::Frame(f) if f.kind == FrameKind::Close => break f,
                _ => continue,
            }
        };
        let outcome: Outcome = serde_json::from_slice(&reply.payload).unwrap();
        match outcome {
            Outcome::Error(e) => assert_eq!(e.code, ErrorCode::Protocol),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert!(ch.sender.is_finished());
    }

    #[tokio::test]
    async fn dropped_handler_answers_internal_and_client_drop_cancels() {
        let (client, mut acceptor) = pair();
        let mut ch = client.open(Bytes::from_static(b"a")).unwrap();
        let (server_ch, _) = acceptor.accept().await.unwrap();
        drop(server_ch);
        let body = next_close(&mut ch.receiver).await;
        let outcome: Outcome = serde_json::from_slice(&body).unwrap();
        assert!(matches!(outcome, Outcome::Error(e) if e.code == ErrorCode::Internal));

        let ch2 = client.open(Bytes::from_static(b"b")).unwrap();
        let (mut server_ch2, _) = acceptor.accept().await.unwrap();
        drop(ch2);
        assert_eq!(
            server_ch2.receiver.recv().await,
            Some(Inbound::Close(Bytes::new()))
        );
    }

    /// A stream whose writes never complete, as a virtio-serial port's
    /// while its host is away; it says when it is dropped.
    struct StalledPort(Arc<std::sync::atomic::AtomicBool>);

    impl AsyncWrite for StalledPort {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    impl Drop for StalledPort {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_write_waiting_when_the_peer_goes_is_dropped_not_left_for_the_next() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, _aw) = tokio::io::split(a);
        let mux = Mux::client(ar, StalledPort(dropped.clone()), MuxConfig::default());
        // The Open frame's write waits on the stalled port.
        let _ch = mux.open(Bytes::from_static(b"x")).unwrap();
        tokio::task::yield_now().await;
        drop(b);
        mux.closed().await;
        // The writer gave its write up (and the port) rather than finishing
        // it whenever the port takes bytes again.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer still holds a write for a peer that is gone"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_shutdown_here_is_told_apart_from_the_peer_going() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, aw) = tokio::io::split(a);
        let client = Mux::client(ar, aw, MuxConfig::default());
        let mut ch = client.open(Bytes::from_static(b"x")).unwrap();
        client.shutdown();
        assert_eq!(ch.receiver.recv().await, None);
        assert!(matches!(ch.receiver.end_error(), MuxError::Shutdown));
        assert!(matches!(client.open(Bytes::new()), Err(MuxError::Shutdown)));
        drop(b);
    }

    #[tokio::test]
    async fn connection_loss_ends_every_channel() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, aw) = tokio::io::split(a);
        let client = Mux::client(ar, aw, MuxConfig::default());
        let mut ch = client.open(Bytes::from_static(b"x")).unwrap();
        drop(b);
        assert_eq!(ch.receiver.recv().await, None);
        // The peer went: not a shutdown here.
        assert!(matches!(
            ch.receiver.end_error(),
            MuxError::ConnectionClosed
        ));
        client.closed().await;
        assert!(matches!(
            client.open(Bytes::new()),
            Err(MuxError::ConnectionClosed)
        ));
    }
}

#[cfg(test)]
mod fuzz {
    //! Arbitrary frame sequences against a server mux: no panic, and the
    //! connection still answers afterwards. Run longer with
    //! `PROPTEST_CASES=20000 cargo test -p bhatti-protocol fuzz`.
    use super::*;
    use proptest::prelude::*;

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let payload = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            Just(br#"{"op":"ping"}"#.to_vec()),
            Just(vec![0, 0, 0, 16]),
            Just(vec![0xff, 0xff, 0xff, 0xff]),
        ];
        (0u32..6, 0u8..16, payload)
            .prop_map(|(ch, kind, p)| Frame::new(ch, FrameKind::from_u8(kind), p))
    }

    proptest! {
        #[test]
        fn server_survives_arbitrary_frames(frames in proptest::collection::vec(arb_frame(), 0..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let (a, b) = tokio::io::duplex(1 << 20);
                let (br, bw) = tokio::io::split(b);
                let (server, mut acceptor, _) = Mux::server(br, bw, MuxConfig::default());
                // Answer every channel with an empty ok, reading whatever comes.
                tokio::spawn(async move {
                    while let Some((ch, _)) = acceptor.accept().await {
                        tokio::spawn(async move {
                            let Channel { sender, mut receiver } = ch;
                            let _ = sender.close(&Outcome::Ok(serde_json::json!({})));
                            while receiver.recv().await.is_some() {}
                        });
                    }
                });
                let (mut ar, mut aw) = tokio::io::split(a);
                let mut buf = BytesMut::new();
                for f in &frames {
                    if f.kind == FrameKind::Hello && f.channel == 0 {
                        continue; // a Hello ends the connection by design
                    }
                    encode_into(f, &mut buf, MAX_PAYLOAD).unwrap();
                }
                // Then a probe on a channel the fuzz never uses.
                encode_into(&Frame::new(1000, FrameKind::Open, &b"probe"[..]), &mut buf, MAX_PAYLOAD).unwrap();
                aw.write_all(&buf).await.unwrap();
                let mut rd = FramedRead::new(&mut ar, FrameCodec::default());
                let answered = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    while let Some(Ok(d)) = rd.next().await {
                        if let Decoded::Frame(f) = d {
                            if f.channel == 1000 && f.kind == FrameKind::Close {
                                return true;
                            }
                        }
                    }
                    false
                })
                .await
                .unwrap_or(false);
                assert!(answered, "the server stopped answering after {frames:?}");
                assert!(!server.is_closed());
            });
        }
    }
}
