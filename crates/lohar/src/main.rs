//! `lohar`: the guest agent. PID 1 inside a sandbox VM; on the host it also
//! runs in a test mode (`lohar serve --unix PATH …`) with no mounts, used by
//! tests and benchmarks.

use std::process::ExitCode;

use lohar::{config, init, listen, reaper, server};

fn main() -> ExitCode {
    if std::process::id() == 1 {
        // Never returns: PID 1 powers the machine off instead of exiting.
        init::run_pid1();
    }
    match config::TestModeArgs::from_env_args() {
        Ok(args) => match run_test_mode(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lohar: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::from(2)
        }
    }
}

fn run_test_mode(args: config::TestModeArgs) -> anyhow::Result<()> {
    init::setup_logging();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let agent = server::AgentState::new(args.config);
        reaper::start(false)?;
        listen::serve_unix(agent, &args.socket).await
    })
}
