//! Streaming a volume into the store and back.
//!
//! Backup: a blocking thread reads the copy in 1 MiB blocks, hashes them
//! (sha256 of the raw data) and feeds zstd, whose output goes in 1 MiB
//! chunks over a bounded channel to the async side, which cuts parts of
//! `part_size_mb` and uploads up to [`PARTS_IN_FLIGHT`] at once. Memory is
//! about `(PARTS_IN_FLIGHT + 1) × part size`, whatever the volume's size.
//! Any failure or cancellation aborts the multipart upload, so no object
//! (and no dangling upload) is left behind; the manifest is written only
//! after the data object is complete.
//!
//! Restore: the object is streamed through a bounded channel to a blocking
//! thread that decompresses into a temp file beside the destination while
//! hashing; only when size and sha256 match the manifest is the temp file
//! synced and renamed over the destination. On any failure the destination
//! is untouched and the temp file is removed (also when the future is
//! dropped).

use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::s3::{BackupInfo, BackupStore, Target};
use super::{BackupError, Result};

/// Parts uploading at once.
pub const PARTS_IN_FLIGHT: usize = 4;
/// Bytes of one read of the source and one chunk on the channels.
const CHUNK: usize = 1 << 20;
/// Chunks queued on a channel.
const QUEUED: usize = 4;

/// What a restore wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInfo {
    pub raw_bytes: u64,
    pub sha256: String,
}

/// Sizes and hash of one backup's data.
struct Sums {
    raw: u64,
    stored: u64,
    sha256: String,
}

/// zstd's output, sent on in [`CHUNK`]s.
struct ChunkSender {
    buf: Vec<u8>,
    tx: mpsc::Sender<Bytes>,
    total: u64,
}

impl ChunkSender {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        self.total += b.len() as u64;
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The blocking half of a backup: read, hash, compress, send.
fn compress<R: Read>(
    mut reader: R,
    tx: mpsc::Sender<Bytes>,
    level: i32,
    threads: u32,
) -> Result<Sums> {
    let sink = ChunkSender {
        buf: Vec::with_capacity(CHUNK),
        tx,
        total: 0,
    };
    let zerr = BackupError::io("compress");
    let mut enc = match zstd::stream::write::Encoder::new(sink, level) {
        Ok(e) => e,
        Err(e) => return Err(zerr(e)),
    };
    if threads > 0 {
        enc.multithread(threads)
            .map_err(BackupError::io("zstd workers"))?;
    }
    let mut hasher = Sha256::new();
    let mut raw = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BackupError::io("read the volume copy")(e)),
        };
        hasher.update(&buf[..n]);
        raw += n as u64;
        enc.write_all(&buf[..n])
            .map_err(BackupError::io("compress"))?;
    }
    let mut sink = enc.finish().map_err(BackupError::io("compress"))?;
    sink.flush().map_err(BackupError::io("compress"))?;
    Ok(Sums {
        raw,
        stored: sink.total,
        sha256: hex::encode(hasher.finalize()),
    })
}

impl BackupStore {
    /// Backs up the file at `source` (a consistent copy of the volume; it
    /// is only read) as backup `id` (see [`super::new_id`]).
    pub async fn backup(
        &self,
        target: &Target,
        id: &str,
        source: &Path,
        cancel: &CancellationToken,
    ) -> Result<BackupInfo> {
        let f = std::fs::File::open(source)
            .map_err(BackupError::io(format!("open {}", source.display())))?;
        self.backup_reader(target, id, f, cancel).await
    }

    /// [`BackupStore::backup`] from any reader.
    pub async fn backup_reader<R: Read + Send + 'static>(
        &self,
        target: &Target,
        id: &str,
        reader: R,
        cancel: &CancellationToken,
    ) -> Result<BackupInfo> {
        let (data_key, _) = self.keys(&target.owner, &target.volume_name, id)?;
        let created_at = crate::store::now_ms();
        let upload = self
            .store
            .put_multipart(&ObjPath::from(data_key.as_str()))
            .await
            .map_err(|e| self.err(e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUED);
        let (level, threads) = (self.level, self.threads);
        let producer = tokio::task::spawn_blocking(move || compress(reader, tx, level, threads));
        let pumped: Result<()> = async {
            loop {
                let chunk = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(BackupError::Cancelled),
                    c = rx.recv() => c,
                };
                let Some(chunk) = chunk else {
                    return Ok(());
                };
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(BackupError::Cancelled),
                    r = w.wait_for_capacity(PARTS_IN_FLIGHT) => r.map_err(|e| self.err(e))?,
                }
                w.put(chunk);
            }
        }
        .await;
        // A producer blocked on a full channel fails its next send and stops.
        drop(rx);
        let produced = producer.await;
        let sums = match (pumped, produced) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(join)) => Err(BackupError::Store(format!(
                "the compression task failed: {join}"
            ))),
            (Ok(()), Ok(r)) => r,
        };
        let sums = match sums {
            Ok(s) => s,
            Err(e) => {
                if let Err(a) = w.abort().await {
                    tracing::warn!(key = %data_key, "aborting the multipart upload: {a}");
                }
                return Err(e);
            }
        };
        // Not cancellable: finish aborts the upload itself when it fails.
        w.finish().await.map_err(|e| self.err(e))?;
        let info = BackupInfo {
            id: id.to_string(),
            owner: target.owner.clone(),
            volume_name: target.volume_name.clone(),
            volume_id: target.volume_id.clone(),
            object_key: data_key.clone(),
            raw_bytes: sums.raw,
            stored_bytes: sums.stored,
            sha256: sums.sha256,
            compression: "zstd".into(),
            created_at,
        };
        if let Err(e) = self.put_manifest(&info).await {
            // Without a manifest the data would be invisible: remove it.
            if let Err(d) = self.store.delete(&ObjPath::from(data_key.as_str())).await {
                tracing::warn!(key = %data_key, "removing data without manifest: {d}");
            }
            return Err(e);
        }
        Ok(info)
    }

    /// Restores `info` into `dest` (created or replaced atomically). The
    /// caller makes sure nothing uses `dest` meanwhile (the volume is not
    /// attached).
    pub async fn restore(&self, info: &BackupInfo, dest: &Path) -> Result<RestoreInfo> {
        let (data_key, _) = self.keys(&info.owner, &info.volume_name, &info.id)?;
        let (dir, name) = match (dest.parent(), dest.file_name()) {
            (Some(d), Some(n)) => (d, n.to_string_lossy().into_owned()),
            _ => {
                return Err(BackupError::BadName(format!(
                    "{} is not a file path",
                    dest.display()
                )))
            }
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let got = match self.store.get(&ObjPath::from(data_key.as_str())).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BackupError::NotFound(info.id.clone()))
            }
            Err(e) => return Err(self.err(e)),
        };
        let mode = std::fs::metadata(dest)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o600);
        let mut suffix = [0u8; 6];
        rand::fill(&mut suffix);
        let temp = TempFile(Some(
            dir.join(format!(".{name}.restore-{}", hex::encode(suffix))),
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(temp.path())
            .map_err(BackupError::io(format!("create {}", temp.path().display())))?;
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUED);
        let consumer = tokio::task::spawn_blocking(move || decompress(file, &mut rx));
        let mut stream = got.into_stream();
        let mut fetched: Result<()> = Ok(());
        while let Some(chunk) = stream.next().await {
            match chunk {
                // The consumer gone: its own error says why.
                Ok(c) => {
                    if tx.send(c).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    fetched = Err(self.err(e));
                    break;
                }
            }
        }
        drop(tx);
        let written = consumer
            .await
            .map_err(|e| BackupError::Store(format!("the decompression task failed: {e}")))?;
        fetched?;
        let (raw, sha) = written.map_err(|e| BackupError::Corrupt {
            id: info.id.clone(),
            why: format!("cannot decompress: {e}"),
        })?;
        if raw != info.raw_bytes || sha != info.sha256 {
            return Err(BackupError::Corrupt {
                id: info.id.clone(),
                why: format!(
                    "restored {raw} bytes with sha256 {sha}; the manifest says {} bytes with {}",
                    info.raw_bytes, info.sha256
                ),
            });
        }
        std::fs::rename(temp.path(), dest)
            .map_err(BackupError::io(format!("rename into {}", dest.display())))?;
        temp.disarm();
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(RestoreInfo {
            raw_bytes: raw,
            sha256: sha,
        })
    }
}

/// Writes what it is given into the file while hashing and counting.
struct HashWriter {
    file: std::fs::File,
    hasher: Sha256,
    n: u64,
}

impl Write for HashWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.file.write(b)?;
        self.hasher.update(&b[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The blocking half of a restore: decompress into the file, sync it, and
/// return its size and sha256.
fn decompress(file: std::fs::File, rx: &mut mpsc::Receiver<Bytes>) -> io::Result<(u64, String)> {
    let sink = HashWriter {
        file,
        hasher: Sha256::new(),
        n: 0,
    };
    let mut dec = zstd::stream::write::Decoder::new(sink)?;
    while let Some(c) = rx.blocking_recv() {
        dec.write_all(&c)?;
    }
    dec.flush()?;
    let sink = dec.into_inner();
    sink.file.sync_all()?;
    Ok((sink.n, hex::encode(sink.hasher.finalize())))
}

/// A temp file removed when dropped, unless disarmed.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
