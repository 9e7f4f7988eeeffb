//! The `bhatti` command line: a client of the HTTP API (docs/api.md) plus the
//! host-side commands (`serve`, `user`, `admin`) that work on the daemon's
//! config and database directly.
//!
//! Output rules (as ripgrep and uv): data on stdout, progress and notes on
//! stderr; `--json` puts one JSON document on stdout (per command; see each
//! command); an error is one line on stderr and a non-zero [`ExitStatus`].

pub mod args;
mod files;
mod host;
mod http;
mod images;
mod output;
mod ports;
mod sandbox;
mod settings;
mod share;
mod shell;
mod templates;
mod volume_backups;
mod volumes;

pub use args::Cli;
use args::Command;

/// How `bhatti` exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: the command did what it was asked.
    Success,
    /// 1: it failed (daemon error, unknown sandbox, I/O …).
    Failure,
    /// 2: the command line was wrong (unknown flag, bad name).
    Usage,
    /// `exec`/`shell`: the remote command's exit code, passed through
    /// (0–255; a command killed by signal n exits 128+n).
    Remote(u8),
    /// 255: `exec`/`shell` failed in bhatti itself (as ssh does), so a script
    /// can tell it from the remote command's own 1 or 2.
    RemoteFailed,
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Usage => 2,
            ExitStatus::Remote(c) => i32::from(c),
            ExitStatus::RemoteFailed => 255,
        }
    }

    /// A remote exit code as bhatti's: 0–255 as is, anything else 255.
    pub fn remote(code: i64) -> ExitStatus {
        match u8::try_from(code) {
            Ok(c) => ExitStatus::Remote(c),
            Err(_) => ExitStatus::Remote(255),
        }
    }
}

/// A failure: one line for stderr and the exit status.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub status: ExitStatus,
}

impl CliError {
    pub fn new(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            status: ExitStatus::Failure,
        }
    }

    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            status: ExitStatus::Usage,
        }
    }

    /// stdout was closed by its reader (`bhatti list | head -1`): stop
    /// quietly with success, as ripgrep does.
    pub fn broken_pipe() -> CliError {
        CliError {
            message: String::new(),
            status: ExitStatus::Success,
        }
    }

    pub fn with_status(mut self, status: ExitStatus) -> CliError {
        self.status = status;
        self
    }
}

impl<E: std::error::Error> From<E> for CliError {
    fn from(e: E) -> Self {
        let mut msg = e.to_string();
        let mut source = e.source();
        // Include causes that add something (hyper and io errors nest).
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            source = s.source();
        }
        CliError::new(msg)
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

/// Runs a parsed command line to its exit status, printing any error as one
/// line on stderr.
pub fn run(cli: Cli) -> ExitStatus {
    let status = match dispatch(cli) {
        Ok(s) => s,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("bhatti: {}", one_line(&e.message));
            }
            e.status
        }
    };
    status
}

/// Collapses a message to one line.
pub fn one_line(s: &str) -> String {
    let parts: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    parts.join("; ")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(format!("cannot start the async runtime: {e}")))
}

fn dispatch(cli: Cli) -> Result<ExitStatus> {
    let g = cli.global;
    let out = output::Printer { json: g.json };
    match cli.command {
        Command::Serve(host) => host::serve(&host),
        Command::User(cmd) => host::user(cmd, &out),
        Command::Admin(cmd) => host::admin(cmd, &out),
        Command::Completion(c) => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            let mut buf = Vec::new();
            clap_complete::generate(c.shell, &mut cmd, "bhatti", &mut buf);
            out.raw(&buf)?;
            Ok(ExitStatus::Success)
        }
        Command::Setup(a) => runtime()?.block_on(settings::setup(&g, a, &out)),
        command => {
            let remote = matches!(command, Command::Exec(_) | Command::Shell(_));
            let rt = runtime()?;
            let r = rt.block_on(async move {
                let client = settings::client(&g)?;
                match command {
                    Command::Create(a) => sandbox::create(&client, a, &out).await,
                    Command::List(a) => sandbox::list(&client, a, &out).await,
                    Command::Inspect(a) => sandbox::inspect(&client, &a.sandbox, &out).await,
                    Command::Edit(a) => sandbox::edit(&client, a, &out).await,
                    Command::Stop(a) => sandbox::stop(&client, &a.sandbox, &out).await,
                    Command::Start(a) => sandbox::start(&client, a, &out).await,
                    Command::Destroy(a) => sandbox::destroy(&client, &a.sandbox, &out).await,
                    Command::Kill(a) => sandbox::kill(&client, a, &out).await,
                    Command::Exec(a) => sandbox::exec(&client, a, &out).await,
                    Command::Shell(a) => shell::shell(&client, a, &out).await,
                    Command::Ps(a) => shell::ps(&client, &a.sandbox, &out).await,
                    Command::Events(a) => sandbox::events(&client, a, &out).await,
                    Command::File(c) => files::file(&client, c, &out).await,
                    Command::Snapshot(c) => sandbox::snapshot(&client, c, &out).await,
                    Command::Secret(c) => sandbox::secret(&client, c, &out).await,
                    Command::Image(c) => images::image(&client, c, &out).await,
                    Command::Template(c) => templates::template(&client, c, &out).await,
                    Command::Volume(c) => volumes::volume(&client, c, &out).await,
                    Command::Ports(a) => ports::ports(&client, a, &out).await,
                    Command::Publish(a) => ports::publish(&client, a, &out).await,
                    Command::Unpublish(a) => ports::unpublish(&client, a, &out).await,
                    Command::Share(a) => share::share(&client, a, &out).await,
                    Command::Serve(_)
                    | Command::User(_)
                    | Command::Admin(_)
                    | Command::Completion(_)
                    | Command::Setup(_) => unreachable!("handled above"),
                }
            });
            if remote {
                r.map_err(remote_failed)
            } else {
                r
            }
        }
    }
}

/// exec/shell failures of bhatti itself exit 255 (usage errors stay 2, a
/// broken pipe stays 0).
fn remote_failed(e: CliError) -> CliError {
    match e.status {
        ExitStatus::Failure => e.with_status(ExitStatus::RemoteFailed),
        _ => e,
    }
}
