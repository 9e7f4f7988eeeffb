//! File operations: streamed read, atomic write, stat, list, mkdir, remove.
//!
//! The agent runs them as root (it is PID 1 in the guest), so the only
//! permission errors a client sees are ones root gets too (read-only mounts,
//! `/proc`, immutable files). What it creates — written files and the
//! directories made for them — is chowned to the sandbox user, so the user's
//! own commands can change it afterwards. All blocking I/O runs on tokio's
//! blocking pool; streams cross over through small bounded queues, which
//! carry the channel's flow control through to the disk.

use std::ffi::OsString;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use bhatti_protocol::mux::{Channel, Inbound};
use bhatti_protocol::{
    ErrorBody, ErrorCode, Event, FileKind, FileStat, Listing, ReadFileDone, ReadFileRequest,
    WriteFileDone, WriteFileRequest,
};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::handlers::{io_error, Reply};
use crate::server::Agent;

/// Largest `Data` chunk a read sends.
/// Files up to this size are read on the agent's thread, not streamed
/// from the blocking pool (see `read`).
const INLINE_READ_MAX: u64 = 64 * 1024;
/// Bodies up to this size are collected before the write task starts.
const INLINE_WRITE_MAX: usize = 64 * 1024;
const READ_CHUNK: usize = 64 * 1024;
/// Chunks queued between the disk and the channel, each way.
const QUEUE_DEPTH: usize = 8;

fn bad_request(msg: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadRequest, msg)
}

fn cancelled() -> ErrorBody {
    ErrorBody::new(ErrorCode::Cancelled, "cancelled by the client")
}

fn to_value<T: serde::Serialize>(v: &T) -> Reply {
    serde_json::to_value(v).map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))
}

/// Accepts only absolute paths without NUL bytes.
pub(crate) fn abs_path(path: &str) -> Result<PathBuf, ErrorBody> {
    if path.is_empty() {
        return Err(bad_request("the path is empty"));
    }
    if path.contains('\0') {
        return Err(bad_request("the path contains a NUL byte"));
    }
    if !path.starts_with('/') {
        return Err(bad_request(format!("the path must be absolute: {path:?}")));
    }
    Ok(PathBuf::from(path))
}

/// Runs blocking file work off the runtime's threads.
async fn blocking<T, F>(f: F) -> Result<T, ErrorBody>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ErrorBody> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ErrorBody::new(
            ErrorCode::Internal,
            format!("file task failed: {e}"),
        ))
    })
}

fn file_stat(name: String, md: &Metadata) -> FileStat {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    FileStat {
        name,
        kind,
        size: md.len(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ms: md.mtime() * 1000 + md.mtime_nsec() / 1_000_000,
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Gives `path` to the sandbox user. Outside a VM (test mode as an ordinary
/// user) chown to another uid is impossible, and that is not an error.
fn chown_to(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && !is_root() => Ok(()),
        r => r,
    }
}

fn fchown_to(file: &File, uid: u32, gid: u32) -> io::Result<()> {
    match std::os::unix::fs::fchown(file, Some(uid), Some(gid)) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && !is_root() => Ok(()),
        r => r,
    }
}

/// `mkdir -p`, giving every directory it creates to `uid:gid`.
pub(crate) fn ensure_dirs(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    loop {
        match fs::metadata(cur) {
            Ok(md) if md.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", cur.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(cur);
                match cur.parent() {
                    Some(p) => cur = p,
                    None => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => chown_to(d, uid, gid)?,
            // Someone else made it meanwhile: as good as ours.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- read

/// Which bytes of the file a read returns: lines `[offset, offset+limit)`,
/// at most `max_bytes` of them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LineWindow {
    skip_lines: u64,
    lines_left: Option<u64>,
    bytes_left: Option<u64>,
}

impl LineWindow {
    pub(crate) fn new(req: &ReadFileRequest) -> Self {
        LineWindow {
            skip_lines: req.offset.unwrap_or(0),
            lines_left: req.limit,
            bytes_left: req.max_bytes,
        }
    }

    /// Consumes one chunk: returns the range to send and whether the window
    /// is exhausted (then `end` is where reading stopped).
    fn feed(&mut self, chunk: &[u8]) -> (usize, usize, bool) {
        let mut start = 0;
        while self.skip_lines > 0 && start < chunk.len() {
            match chunk[start..].iter().position(|&b| b == b'\n') {
                Some(j) => {
                    self.skip_lines -= 1;
                    start += j + 1;
                }
                None => start = chunk.len(),
            }
        }
        if self.skip_lines > 0 {
            return (chunk.len(), chunk.len(), false);
        }
        let mut end = chunk.len();
        let mut stop = false;
        if let Some(left) = self.lines_left.as_mut() {
            if *left == 0 {
                end = start;
                stop = true;
            } else {
                let mut i = start;
                while let Some(j) = chunk[i..].iter().position(|&b| b == b'\n') {
                    *left -= 1;
                    i += j + 1;
                    if *left == 0 {
                        end = i;
                        stop = true;
                        break;
                    }
                }
            }
        }
        if let Some(left) = self.bytes_left.as_mut() {
            let n = (end - start) as u64;
            if n >= *left {
                end = start + *left as usize;
                *left = 0;
                // At the byte limit; whether anything was cut off is
                // decided by looking for more data after `end`.
                stop = true;
            } else {
                *left -= n;
            }
        }
        (start, end, stop)
    }
}

pub(crate) struct ReadSummary {
    pub(crate) bytes: u64,
    pub(crate) truncated: bool,
}

/// Opens a regular file without blocking on FIFOs or devices.
pub(crate) fn open_regular(path: &Path) -> Result<(File, Metadata), ErrorBody> {
    let ctx = || format!("read {}", path.display());
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io_error(&ctx(), &e))?;
    let md = file.metadata().map_err(|e| io_error(&ctx(), &e))?;
    if !md.is_file() {
        return Err(ErrorBody::new(
            ErrorCode::NotAFile,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok((file, md))
}

fn read_retry(file: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// A small file's read, in memory: the window's chunks and the summary.
pub(crate) fn produce(
    mut file: impl Read,
    path: &Path,
    mut window: LineWindow,
) -> Result<(Vec<Bytes>, ReadSummary), ErrorBody> {
    let ctx = || format!("read {}", path.display());
    let mut buf = vec![0u8; READ_CHUNK];
    let mut chunks = Vec::new();
    let mut bytes = 0u64;
    loop {
        let n = read_retry(&mut file, &mut buf).map_err(|e| io_error(&ctx(), &e))?;
        if n == 0 {
            let summary = ReadSummary {
                bytes,
                truncated: false,
            };
            return Ok((chunks, summary));
        }
        let (start, end, stop) = window.feed(&buf[..n]);
        if end > start {
            bytes += (end - start) as u64;
            chunks.push(Bytes::copy_from_slice(&buf[start..end]));
        }
        if stop {
            let more = end < n || read_retry(&mut file, &mut buf[..1]).unwrap_or(0) > 0;
            let summary = ReadSummary {
                bytes,
                truncated: more,
            };
            return Ok((chunks, summary));
        }
    }
}

/// The bytes a read returns: `[start, start + len)` of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) start: u64,
    pub(crate) len: u64,
    /// The window stopped before the end of the file.
    pub(crate) truncated: bool,
}

/// Finds the bytes `window` selects, leaving `file` at their start, so
/// their length is known (and announced) before the first one is sent.
/// Lines are found by scanning from the start; without them no scan is
/// needed. `size` (the size at open) bounds the read. `stop` is polled
/// between chunks: a cancelled read stops scanning.
pub(crate) fn locate(
    file: &mut File,
    path: &Path,
    mut window: LineWindow,
    size: u64,
    stop: impl Fn() -> bool,
) -> Result<Extent, ErrorBody> {
    if window.skip_lines == 0 && window.lines_left.is_none() {
        let len = window.bytes_left.map_or(size, |m| m.min(size));
        return Ok(Extent {
            start: 0,
            len,
            truncated: len < size,
        });
    }
    let ctx = || format!("read {}", path.display());
    let mut buf = vec![0u8; READ_CHUNK];
    let mut reader = Read::by_ref(file).take(size);
    let mut pos = 0u64;
    let mut first: Option<u64> = None;
    let extent = loop {
        if stop() {
            return Err(cancelled());
        }
        let n = read_retry(&mut reader, &mut buf).map_err(|e| io_error(&ctx(), &e))?;
        if n == 0 {
            let start = first.unwrap_or(pos);
            break Extent {
                start,
                len: pos - start,
                truncated: false,
            };
        }
        let (s, e, done) = window.feed(&buf[..n]);
        if first.is_none() && window.skip_lines == 0 {
            first = Some(pos + s as u64);
        }
        if done {
            let more = e < n || read_retry(&mut reader, &mut buf[..1]).unwrap_or(0) > 0;
            let start = first.unwrap_or(pos + s as u64);
            break Extent {
                start,
                len: pos + e as u64 - start,
                truncated: more,
            };
        }
        pos += n as u64;
    };
    file.seek(SeekFrom::Start(extent.start))
        .map_err(|e| io_error(&ctx(), &e))?;
    Ok(extent)
}

/// Sends `len` bytes from the file's position; fewer if it shrank.
fn copy_out(
    file: &mut File,
    path: &Path,
    len: u64,
    mut emit: impl FnMut(Bytes) -> Result<(), ErrorBody>,
) -> Result<u64, ErrorBody> {
    let ctx = || format!("read {}", path.display());
    let mut sent = 0u64;
    while sent < len {
        let want = (len - sent).min(READ_CHUNK as u64) as usize;
        let mut chunk = bytes::BytesMut::zeroed(want);
        let n = read_retry(file, &mut chunk).map_err(|e| io_error(&ctx(), &e))?;
        if n == 0 {
            break;
        }
        chunk.truncate(n);
        sent += n as u64;
        emit(chunk.freeze())?;
    }
    Ok(sent)
}

fn file_info(size: u64, mode: u32, bytes: u64, truncated: bool) -> Bytes {
    let info = Event::FileInfo {
        size,
        mode,
        bytes: Some(bytes),
        truncated: Some(truncated),
    };
    Bytes::from(serde_json::to_vec(&info).unwrap_or_default())
}

/// What the disk side of a large read hands the channel side.
enum Piece {
    Info(Extent),
    Data(Bytes),
}

pub async fn read(agent: &Agent, channel: Channel, req: ReadFileRequest) -> Reply {
    let path = abs_path(&req.path)?;
    agent.activity.touch();
    let Channel {
        sender,
        mut receiver,
    } = channel;
    // Opening is a path lookup (O_NONBLOCK: a FIFO cannot hang us), done
    // here: a hop to the blocking pool costs more than the call.
    let (file, md) = open_regular(&path)?;
    let size = md.len();
    let mode = md.mode() & 0o7777;
    let window = LineWindow::new(&req);

    if size <= INLINE_READ_MAX {
        // Small files (the common case for a coding agent) are read right
        // here: page-cache reads take microseconds, and the whole file fits
        // in the channel's initial window, so sending never waits long.
        let (chunks, summary) = produce(file.take(size), &path, window)?;
        let info = file_info(size, mode, summary.bytes, summary.truncated);
        sender.event(info).map_err(|_| cancelled())?;
        for chunk in chunks {
            sender.data(chunk).await.map_err(|_| cancelled())?;
        }
        return to_value(&ReadFileDone {
            bytes: summary.bytes,
            total_size: size,
            truncated: summary.truncated,
        });
    }

    let (tx, mut rx) = mpsc::channel::<Piece>(QUEUE_DEPTH);
    // A closed queue means the channel side gave up (cancel).
    let producer = tokio::task::spawn_blocking(move || {
        let mut file = file;
        let extent = locate(&mut file, &path, window, size, || tx.is_closed())?;
        let send = |p| tx.blocking_send(p).map_err(|_| cancelled());
        send(Piece::Info(extent))?;
        let bytes = copy_out(&mut file, &path, extent.len, |b| send(Piece::Data(b)))?;
        Ok::<_, ErrorBody>(ReadSummary {
            bytes,
            truncated: extent.truncated,
        })
    });
    loop {
        let step = async {
            match rx.recv().await {
                Some(Piece::Info(e)) => sender
                    .event(file_info(size, mode, e.len, e.truncated))
                    .map(|()| true),
                Some(Piece::Data(chunk)) => sender.data(chunk).await.map(|()| true),
                None => Ok(false),
            }
        };
        tokio::select! {
            biased;
            // Cancel or disconnect: dropping `rx` stops the producer.
            _ = crate::handlers::cancelled(&mut receiver) => return Err(cancelled()),
            r = step => match r {
                Ok(true) => agent.activity.touch(),
                Ok(false) => break,
                Err(_) => return Err(cancelled()),
            },
        }
    }
    let summary = producer.await.unwrap_or_else(|e| {
        Err(ErrorBody::new(
            ErrorCode::Internal,
            format!("read task failed: {e}"),
        ))
    })?;
    to_value(&ReadFileDone {
        bytes: summary.bytes,
        total_size: size,
        truncated: summary.truncated,
    })
}

// ---------------------------------------------------------------- write

enum WriteMsg {
    Data(Bytes),
    Commit,
}

/// Removes the temp file unless the write was committed.
struct TempFile {
    path: Option<PathBuf>,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_file(p);
        }
    }
}

struct PendingWrite {
    file: File,
    temp: TempFile,
    target: PathBuf,
}

/// A temp file name next to the target: hidden, unique, and short enough
/// for NAME_MAX whatever the target's name.
fn temp_name(target_name: &std::ffi::OsStr) -> OsString {
    let name = target_name.as_bytes();
    let mut out = b".".to_vec();
    out.extend_from_slice(&name[..name.len().min(100)]);
    out.push(b'.');
    out.extend_from_slice(&crate::server::random_id().as_bytes()[..16]);
    out.extend_from_slice(b".bhatti-tmp");
    OsString::from_vec(out)
}

fn prepare_write(target: PathBuf, uid: u32, gid: u32) -> Result<PendingWrite, ErrorBody> {
    let ctx = |e: &io::Error| io_error(&format!("write {}", target.display()), e);
    // Only `/` (however spelled: `//`, `/.`) has no parent or name: a
    // directory, like any other a write is aimed at.
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(ErrorBody::new(
            ErrorCode::NotAFile,
            format!("{} is a directory", target.display()),
        ));
    };
    let dir = dir.to_path_buf();
    ensure_dirs(&dir, uid, gid).map_err(|e| ctx(&e))?;
    if let Ok(md) = fs::metadata(&target) {
        if md.is_dir() {
            return Err(ErrorBody::new(
                ErrorCode::NotAFile,
                format!("{} is a directory", target.display()),
            ));
        }
    }
    let mut attempts = 0;
    loop {
        let temp = dir.join(temp_name(name));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&temp)
        {
            Ok(file) => {
                return Ok(PendingWrite {
                    file,
                    temp: TempFile { path: Some(temp) },
                    target,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
            Err(e) => return Err(ctx(&e)),
        }
    }
}

impl PendingWrite {
    /// The disk side of a write: chunks from `rx`, then commit or discard.
    fn run(
        mut self,
        mut rx: mpsc::Receiver<WriteMsg>,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<u64, ErrorBody> {
        let target = self.target.clone();
        let ctx = |e: &io::Error| io_error(&format!("write {}", target.display()), e);
        let mut bytes = 0u64;
        loop {
            match rx.blocking_recv() {
                Some(WriteMsg::Data(b)) => {
                    self.file.write_all(&b).map_err(|e| ctx(&e))?;
                    bytes += b.len() as u64;
                }
                Some(WriteMsg::Commit) => break,
                // The channel side gave up: `self.temp` removes the file.
                None => return Err(cancelled()),
            }
        }
        self.file.sync_all().map_err(|e| ctx(&e))?;
        // chown before chmod: chown clears setuid/setgid bits.
        fchown_to(&self.file, uid, gid).map_err(|e| ctx(&e))?;
        self.file
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| ctx(&e))?;
        let temp = self.temp.path.clone().unwrap_or_default();
        // The data is on disk before the rename, so a reader or a crash sees
        // the old file or the new one, never a partial one. The directory is
        // not fsynced: the rename reaches the disk with ext4's next commit
        // (≤ 5 s) or the guest's sync before every snapshot, and a second
        // flush per write (a host-level flush under a VMM) would nearly
        // double the cost of small writes.
        fs::rename(&temp, &self.target).map_err(|e| ctx(&e))?;
        self.temp.path = None;
        Ok(bytes)
    }
}

/// Where a write goes and how: (path, mode, uid, gid), or why not.
pub(crate) fn write_target(
    agent: &Agent,
    req: &WriteFileRequest,
) -> Result<(PathBuf, u32, u32, u32), ErrorBody> {
    let path = abs_path(&req.path)?;
    let mode = req.mode.unwrap_or(0o644);
    if mode > 0o7777 {
        return Err(bad_request(format!("mode {mode:#o} is out of range")));
    }
    let (uid, gid) = if req.place {
        if path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(bad_request("a placed file's path has no '..'"));
        }
        crate::init::placed_owner(&agent.config, &path)
    } else {
        (agent.config.uid, agent.config.gid)
    };
    Ok((path, mode, uid, gid))
}

pub async fn write(agent: &Agent, channel: Channel, req: WriteFileRequest) -> Reply {
    let (path, mode, uid, gid) = write_target(agent, &req)?;
    agent.activity.touch();
    let Channel {
        sender: _sender,
        mut receiver,
    } = channel;
    // Small writes (the whole body before Eof, up to INLINE_WRITE_MAX) are
    // collected here and committed by one blocking task: each hop between
    // threads costs tens of microseconds, the fsyncs must not stall the
    // agent's thread, and a large body streams to the worker as it comes.
    let mut head: Vec<Bytes> = Vec::new();
    let mut head_len = 0usize;
    let complete = loop {
        match receiver.recv().await {
            Some(Inbound::Data(b)) => {
                agent.activity.touch();
                head_len += b.len();
                head.push(b);
                if head_len > INLINE_WRITE_MAX {
                    break false;
                }
            }
            Some(Inbound::Eof) => break true,
            Some(Inbound::Close(_)) | None => return Err(cancelled()),
            Some(_) => {}
        }
    };
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH.max(head.len() + 1));
    for b in head {
        // The queue was sized to hold the head, and the worker is not running yet.
        let _ = tx.try_send(WriteMsg::Data(b));
    }
    let worker =
        tokio::task::spawn_blocking(move || prepare_write(path, uid, gid)?.run(rx, mode, uid, gid));
    if complete {
        let _ = tx.try_send(WriteMsg::Commit);
    }
    if !complete {
        loop {
            match receiver.recv().await {
                Some(Inbound::Data(b)) => {
                    agent.activity.touch();
                    // A closed queue means the worker failed; its error follows.
                    if tx.send(WriteMsg::Data(b)).await.is_err() {
                        break;
                    }
                }
                Some(Inbound::Eof) => {
                    let _ = tx.send(WriteMsg::Commit).await;
                    break;
                }
                Some(Inbound::Close(_)) | None => {
                    drop(tx);
                    let _ = worker.await;
                    return Err(cancelled());
                }
                Some(_) => {}
            }
        }
    }
    drop(tx);
    let bytes = worker.await.unwrap_or_else(|e| {
        Err(ErrorBody::new(
            ErrorCode::Internal,
            format!("write task failed: {e}"),
        ))
    })?;
    agent.activity.touch();
    to_value(&WriteFileDone { bytes })
}

// ---------------------------------------------------------------- metadata

fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into())
}

pub async fn stat(agent: &Agent, path: &str) -> Reply {
    let path = abs_path(path)?;
    agent.activity.touch();
    // One lstat: cheaper than a hop to the blocking pool.
    let md = fs::symlink_metadata(&path)
        .map_err(|e| io_error(&format!("stat {}", path.display()), &e))?;
    to_value(&file_stat(display_name(&path), &md))
}

pub async fn list(agent: &Agent, path: &str, limit: Option<u32>) -> Reply {
    let path = abs_path(path)?;
    let max = agent.config.limits.max_list_entries;
    let limit = limit.unwrap_or(max).min(max) as usize;
    agent.activity.touch();
    let listing = blocking(move || {
        let ctx = |e: &io::Error| io_error(&format!("list {}", path.display()), e);
        let mut names = Vec::new();
        for entry in fs::read_dir(&path).map_err(|e| ctx(&e))? {
            names.push(entry.map_err(|e| ctx(&e))?.file_name());
        }
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let truncated = names.len() > limit;
        names.truncate(limit);
        let entries = names
            .into_iter()
            // An entry removed since readdir is simply not listed.
            .filter_map(|n| {
                let md = fs::symlink_metadata(path.join(&n)).ok()?;
                Some(file_stat(n.to_string_lossy().into_owned(), &md))
            })
            .collect();
        Ok(Listing { entries, truncated })
    })
    .await?;
    to_value(&listing)
}

pub async fn mkdir(agent: &Agent, path: &str) -> Reply {
    let path = abs_path(path)?;
    agent.activity.touch();
    let (uid, gid) = (agent.config.uid, agent.config.gid);
    blocking(move || {
        ensure_dirs(&path, uid, gid).map_err(|e| {
            let code_ctx = format!("mkdir {}", path.display());
            if e.kind() == io::ErrorKind::NotADirectory {
                ErrorBody::new(ErrorCode::AlreadyExists, format!("{code_ctx}: {e}"))
            } else {
                io_error(&code_ctx, &e)
            }
        })
    })
    .await?;
    Ok(serde_json::json!({}))
}

/// What a remove may delete: refuses anything that is, or could resolve
/// to, the root.
pub(crate) fn remove_target(path: &str) -> Result<PathBuf, ErrorBody> {
    let path = abs_path(path)?;
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(bad_request("remove does not accept '..' in paths"));
    }
    if !path.components().any(|c| matches!(c, Component::Normal(_))) {
        return Err(bad_request("refusing to remove /"));
    }
    Ok(path)
}

pub async fn remove(agent: &Agent, path: &str, recursive: bool) -> Reply {
    let path = remove_target(path)?;
    agent.activity.touch();
    blocking(move || {
        let ctx = |e: &io::Error| io_error(&format!("remove {}", path.display()), e);
        let md = fs::symlink_metadata(&path).map_err(|e| ctx(&e))?;
        let r = if !md.is_dir() {
            fs::remove_file(&path)
        } else if recursive {
            // Does not follow symlinks: a link to elsewhere is unlinked only.
            fs::remove_dir_all(&path)
        } else {
            fs::remove_dir(&path)
        };
        r.map_err(|e| {
            if e.kind() == io::ErrorKind::DirectoryNotEmpty {
                bad_request(format!(
                    "{} is not empty (ask for a recursive remove)",
                    path.display()
                ))
            } else {
                ctx(&e)
            }
        })
    })
    .await?;
    Ok(serde_json::json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(window: &mut LineWindow, data: &[u8], chunk: usize) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        for c in data.chunks(chunk) {
            let (s, e, stop) = window.feed(c);
            out.extend_from_slice(&c[s..e]);
            if stop {
                return (out, true);
            }
        }
        (out, false)
    }

    fn win(offset: Option<u64>, limit: Option<u64>, max_bytes: Option<u64>) -> LineWindow {
        LineWindow::new(&ReadFileRequest {
            path: "/x".into(),
            offset,
            limit,
            max_bytes,
        })
    }

    #[test]
    fn line_window_across_chunk_sizes() {
        let data = b"l0\nl1\nl2\nl3\nl4";
        for chunk in 1..=data.len() {
            assert_eq!(
                run(&mut win(Some(1), Some(2), None), data, chunk),
                (b"l1\nl2\n".to_vec(), true)
            );
            assert_eq!(run(&mut win(Some(4), None, None), data, chunk).0, b"l4");
            assert_eq!(run(&mut win(Some(9), None, None), data, chunk).0, b"");
            assert_eq!(
                run(&mut win(None, None, Some(4)), data, chunk),
                (b"l0\nl".to_vec(), true)
            );
            assert_eq!(
                run(&mut win(Some(1), Some(3), Some(5)), data, chunk).0,
                b"l1\nl2"
            );
            assert_eq!(run(&mut win(None, Some(0), None), data, chunk).0, b"");
        }
    }

    /// A large read announces what a small one streams: the same bytes,
    /// the same truncation, whatever the window.
    #[test]
    fn located_extent_matches_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Lines of varied length, over several chunks, no final newline.
        let mut data = Vec::new();
        for i in 0..40_000u32 {
            data.extend_from_slice(format!("{}\n", "x".repeat((i % 17) as usize)).as_bytes());
        }
        data.extend_from_slice(b"tail");
        fs::write(&path, &data).unwrap();
        let size = data.len() as u64;
        let cases = [
            (None, None, None),
            (None, None, Some(0)),
            (None, None, Some(100_000)),
            (None, None, Some(size + 5)),
            (Some(0), Some(0), None),
            (Some(1), None, None),
            (Some(3_000), Some(20_000), None),
            (Some(39_999), Some(5), None),
            (Some(40_000), None, None),
            (Some(50_000), Some(1), None),
            (None, Some(1), Some(1)),
            (Some(10), Some(30_000), Some(200_001)),
        ];
        for (offset, limit, max_bytes) in cases {
            let w = win(offset, limit, max_bytes);
            let (chunks, want) = produce(File::open(&path).unwrap(), &path, w).unwrap();
            let mut f = File::open(&path).unwrap();
            let ext = locate(&mut f, &path, w, size, || false).unwrap();
            let mut got = Vec::new();
            let n = copy_out(&mut f, &path, ext.len, |b| {
                got.extend_from_slice(&b);
                Ok(())
            })
            .unwrap();
            let case = format!("{offset:?} {limit:?} {max_bytes:?}");
            assert_eq!(got, chunks.concat(), "{case}");
            assert_eq!((n, ext.truncated), (want.bytes, want.truncated), "{case}");
        }
        let mut f = File::open(&path).unwrap();
        assert!(locate(&mut f, &path, win(Some(1), None, None), size, || true).is_err());
    }

    #[test]
    fn paths_are_checked() {
        assert!(abs_path("").is_err());
        assert!(abs_path("a/b").is_err());
        assert!(abs_path("/a\0b").is_err());
        assert!(abs_path("/a/b").is_ok());
        let t = temp_name(std::ffi::OsStr::from_bytes(&[b'x'; 255]));
        assert!(t.len() < 255);
    }
}
