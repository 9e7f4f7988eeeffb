//! Where connections come from: a unix socket (test mode), AF_VSOCK
//! (Firecracker) or a virtio-serial port (QEMU).

use std::path::Path;

use anyhow::Context;
use tokio::net::UnixListener;

use crate::server::{serve_connection, Agent};

/// Test mode: accept connections on a unix socket forever.
pub async fn serve_unix(agent: Agent, path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    tracing::info!("listening on {}", path.display());
    loop {
        let (stream, _) = listener.accept().await?;
        let agent = agent.clone();
        tokio::spawn(async move {
            let (r, w) = stream.into_split();
            serve_connection(agent, r, w, None).await;
        });
    }
}
