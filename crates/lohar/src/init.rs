//! PID 1 duties: mounts, hostname, network, config drive, poweroff.

use crate::handlers::Reply;

pub fn run_pid1() -> ! {
    eprintln!("lohar: PID 1 mode not implemented yet");
    loop {
        std::thread::park();
    }
}

pub fn setup_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("LOHAR_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn sync() -> Reply {
    tokio::task::spawn_blocking(nix::unistd::sync).await.ok();
    Ok(serde_json::json!({}))
}

pub fn request_poweroff() -> Reply {
    Err(bhatti_protocol::ErrorBody::new(
        bhatti_protocol::ErrorCode::Unsupported,
        "shutdown is only available when lohar is PID 1",
    ))
}
