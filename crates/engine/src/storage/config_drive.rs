//! The config drive: a 4 MiB read-only ext4 image labelled
//! `bhatti-config` holding `config.json` (a [`GuestConfig`]). It carries
//! the sandbox token, so the image and its staging dir are owner-only.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use bhatti_protocol::guest_config::{GuestConfig, CONFIG_FILE, CONFIG_LABEL};

use super::{Result, StorageError};

/// Writes the config drive image to `dest` (replacing it).
pub async fn write_config_drive(dest: &Path, cfg: &GuestConfig) -> Result<()> {
    let json = cfg
        .to_json()
        .map_err(|e| StorageError::ConfigDrive(e.to_string()))?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    let staging = parent.join(format!(
        ".config-drive-{}",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let _ = std::fs::remove_dir_all(&staging);
    let result = async {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| StorageError::io(format!("creating {}", staging.display()), e))?;
        let file = staging.join(CONFIG_FILE);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(|e| StorageError::io(format!("creating {}", file.display()), e))?;
        f.write_all(&json)
            .map_err(|e| StorageError::io(format!("writing {}", file.display()), e))?;
        drop(f);
        let _ = std::fs::remove_file(dest);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| StorageError::io(format!("creating {}", dest.display()), e))?;
        crate::cmd::run(
            "mkfs.ext4",
            [
                "-q".as_ref(),
                "-F".as_ref(),
                "-d".as_ref(),
                staging.as_os_str(),
                "-L".as_ref(),
                CONFIG_LABEL.as_ref(),
                dest.as_os_str(),
                "4M".as_ref(), // CONFIG_DRIVE_BYTES
            ],
        )
        .await?;
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&staging);
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

/// Size of every config drive.
pub const CONFIG_DRIVE_BYTES: u64 = 4 << 20;

/// An empty (sparse, all zeroes) drive of the config drive's size, for a
/// guest restored from memory: it applied its config long ago and never
/// reads the drive again, and a later fresh boot writes a real one. Spares
/// a fork the `mkfs.ext4` run.
pub fn write_placeholder_drive(dest: &Path) -> Result<()> {
    let _ = std::fs::remove_file(dest);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| StorageError::io(format!("creating {}", dest.display()), e))?;
    f.set_len(CONFIG_DRIVE_BYTES)
        .map_err(|e| StorageError::io(format!("sizing {}", dest.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn makes_a_private_ext4_image() {
        if crate::cmd::run("mkfs.ext4", ["-V"]).await.is_err() {
            bhatti_testkit::skip("config_drive", "mkfs.ext4 is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("config.ext4");
        let cfg = GuestConfig::from_json(br#"{"sandbox_id":"a","hostname":"b","token":"secret"}"#)
            .unwrap();
        write_config_drive(&dest, &cfg).await.unwrap();
        let meta = std::fs::metadata(&dest).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 4 << 20);
        // The JSON is inside; debugfs reads it without mounting.
        if let Ok(out) = crate::cmd::run(
            "debugfs",
            ["-R".as_ref(), "cat /config.json".as_ref(), dest.as_os_str()],
        )
        .await
        {
            let back = GuestConfig::from_json(out.as_bytes()).unwrap();
            assert_eq!(back, cfg);
        }
        let label = crate::cmd::run("e2label", [dest.as_os_str()])
            .await
            .unwrap();
        assert_eq!(label.trim(), CONFIG_LABEL);
        // Only the image is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
