//! The command line, as clap derive types. Parsing only: settings are
//! resolved (flags > environment > config file > defaults) in
//! [`super::settings`], and every command runs in its own module.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// bhatti: sandboxes in microVMs.
///
/// Data goes to stdout and everything else (progress, notes) to stderr.
/// Exit codes: 0 success, 1 error, 2 usage error; `exec` and `shell` exit
/// with the remote command's code, and 255 when bhatti itself failed.
#[derive(Debug, Parser)]
#[command(
    name = "bhatti",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// The daemon: `unix:///run/bhatti/bhatti.sock` (default) or
    /// `http://host:port`.
    #[arg(long, global = true, env = "BHATTI_URL", value_name = "URL")]
    pub url: Option<String>,
    /// API key (`bht_…`).
    #[arg(
        long,
        global = true,
        env = "BHATTI_TOKEN",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Save the daemon's address and your API key for later commands.
    Setup(SetupArgs),
    /// Create a sandbox and wait until it answers (idempotent by name).
    Create(CreateArgs),
    /// List your sandboxes.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one sandbox.
    Inspect(SandboxArg),
    /// Change a sandbox's keep-hot flag or labels.
    Edit(EditArgs),
    /// Run a command in a sandbox; its output streams and its exit code
    /// becomes bhatti's.
    Exec(ExecArgs),
    /// An interactive terminal in a sandbox (Ctrl+\ detaches).
    Shell(ShellArgs),
    /// List a sandbox's terminal sessions.
    Ps(SandboxArg),
    /// Read, write and list files in a sandbox.
    #[command(subcommand)]
    File(FileCommand),
    /// Stop a sandbox: its memory is saved to disk and freed.
    Stop(SandboxArg),
    /// Start a stopped sandbox.
    Start(StartArgs),
    /// Destroy a sandbox with its disks.
    #[command(visible_alias = "rm")]
    Destroy(DestroyArgs),
    /// Kill a session (a shell or a piped command) in a sandbox.
    Kill(KillArgs),
    /// Checkpoints: named snapshots of a running sandbox.
    #[command(subcommand, visible_alias = "snapshots")]
    Snapshot(SnapshotCommand),
    /// Secrets, injected into sandboxes' environments by name.
    #[command(subcommand, visible_alias = "secrets")]
    Secret(SecretCommand),
    /// Images: pull from a registry, import a tarball, save a sandbox's disk.
    #[command(subcommand, visible_alias = "images")]
    Image(ImageCommand),
    /// Templates: named sandbox recipes, kept pre-booted for instant creates.
    #[command(subcommand, visible_alias = "templates")]
    Template(super::templates::TemplateCommand),
    /// Volumes: ext4 disks that outlive sandboxes.
    #[command(subcommand, visible_alias = "volumes")]
    Volume(super::volumes::VolumeCommand),
    /// Print a link that opens a sandbox's terminal in a browser.
    Share(super::share::ShareArgs),
    /// The event log of your sandboxes (create, stop, start, destroy, warm,
    /// cold, wake and their latencies, failures, rejections), oldest first.
    Events(EventsArgs),
    /// A sandbox's listening TCP ports; without a sandbox, your published ports.
    Ports(PortsArgs),
    /// Publish a sandbox's port at a public URL (wakes the sandbox on request).
    Publish(PublishArgs),
    /// Take a published port back.
    Unpublish(UnpublishArgs),
    /// Print a shell completion script.
    Completion(CompletionArgs),
    /// Run the daemon (on the host, as root).
    Serve(HostArgs),
    /// Manage API users (on the host, as root; works on the daemon's database).
    #[command(subcommand)]
    User(UserCommand),
    /// Host administration.
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Args)]
pub struct PortsArgs {
    /// Sandbox name or id.
    pub sandbox: Option<String>,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// The guest port.
    #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// The public name (lowercase letters, digits, '-'); default
    /// `<sandbox>-<port>`.
    #[arg(short, long)]
    pub alias: Option<String>,
}

#[derive(Debug, Args)]
pub struct UnpublishArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// The guest port.
    #[arg(short, long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Save without checking that the daemon answers and accepts the key.
    #[arg(long)]
    pub no_verify: bool,
}

/// A sandbox by name or id.
#[derive(Debug, Args)]
pub struct SandboxArg {
    /// Sandbox name or id.
    pub sandbox: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only sandboxes with this label (repeatable; all must match).
    #[arg(short, long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Do not ask (destroy never asks today; accepted for scripts).
    #[arg(short, long)]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Session id (see `bhatti ps`).
    pub session: String,
    /// Signal number (default 9, SIGKILL).
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=64))]
    pub signal: Option<i32>,
}

/// Comma-separated `KEY=VALUE` pairs: `A=1,B=2`. A comma splits only where
/// a new `KEY=` follows, so `X=a,b` stays one value.
#[derive(Debug, Clone)]
pub struct KeyValues(pub Vec<(String, String)>);

pub fn parse_key_values(s: &str) -> Result<KeyValues, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in s.split(',') {
        let starts_pair = part.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        match out.last_mut() {
            Some((_, v)) if !starts_pair => {
                v.push(',');
                v.push_str(part);
            }
            _ => out.push(parse_key_value(part)?),
        }
    }
    Ok(KeyValues(out))
}

/// A `--file` of `bhatti create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub local: PathBuf,
    pub guest: String,
    /// Octal permission bits; `None` keeps the local file's.
    pub mode: Option<u32>,
}

/// `LOCAL:GUEST[:MODE]`, the guest path absolute and MODE octal:
/// `./app.js:/app/app.js`, `./key:/home/lohar/.ssh/id:600`. A guest path
/// ending in `:` and octal digits reads as a mode.
pub fn parse_file_spec(s: &str) -> Result<FileSpec, String> {
    let Some(i) = s.find(":/").filter(|&i| i > 0) else {
        return Err(format!(
            "expected LOCAL:GUEST[:MODE] with an absolute guest path, got {s:?}"
        ));
    };
    let (local, rest) = (&s[..i], &s[i + 1..]);
    let (guest, mode) = match rest.rsplit_once(':') {
        Some((g, m)) if !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()) => {
            let mode = parse_mode(m)?;
            (g, Some(mode))
        }
        _ => (rest, None),
    };
    bhatti::engine::validate_file_path(guest)?;
    Ok(FileSpec {
        local: PathBuf::from(local),
        guest: guest.to_owned(),
        mode,
    })
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name: lower-case letters, digits and '-' (the daemon picks one when
    /// absent).
    #[arg(value_parser = parse_name)]
    pub name: Option<String>,
    /// The name, as a flag (the same as the positional NAME).
    #[arg(long = "name", id = "name_flag", value_name = "NAME", value_parser = parse_name, conflicts_with = "name")]
    pub name_flag: Option<String>,
    /// Place a local file in the sandbox before anything runs (repeatable);
    /// MODE is octal, default the local file's.
    #[arg(long = "file", value_name = "LOCAL:GUEST[:MODE]", value_parser = parse_file_spec)]
    pub files: Vec<FileSpec>,
    /// Mount one of your volumes (repeatable; `:ro` read-only).
    #[arg(long = "volume", value_name = "NAME:/MOUNT[:ro]", value_parser = super::volumes::parse_volume_spec)]
    pub volumes: Vec<bhatti::api_types::SandboxVolume>,
    /// vCPUs.
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long, value_name = "MB")]
    pub memory: Option<u32>,
    /// Root disk size in MiB.
    #[arg(long, visible_alias = "disk-size", value_name = "MB")]
    pub disk: Option<u64>,
    /// Environment variables for every command: KEY=VALUE, or several as
    /// A=1,B=2 (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE[,…]", value_parser = parse_key_values)]
    pub env: Vec<KeyValues>,
    /// Shell script run once at first boot, as the session `init`.
    #[arg(long, value_name = "SCRIPT")]
    pub init: Option<String>,
    /// Return only once init has ended (its outcome is shown).
    #[arg(long)]
    pub wait_init: bool,
    /// Never pause or snapshot this sandbox when idle.
    #[arg(long)]
    pub keep_hot: bool,
    /// Label (repeatable).
    #[arg(short, long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// One of your secrets to put into the environment (repeatable).
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// Start from this checkpoint (a fork with a fresh identity).
    #[arg(long, visible_alias = "from", value_name = "CHECKPOINT", value_parser = parse_name)]
    pub from_snapshot: Option<String>,
    /// Root disk from this image: a catalogue name or a registry reference
    /// (pulled on demand), e.g. `python:3.12`.
    #[arg(long, value_name = "IMAGE", conflicts_with = "from_snapshot")]
    pub image: Option<String>,
    /// Start from this template (`bhatti template create`).
    #[arg(long, value_name = "TEMPLATE", value_parser = parse_name, conflicts_with = "from_snapshot")]
    pub template: Option<String>,
    /// No egress at all (sibling sandboxes and DNS still work).
    #[arg(long)]
    pub no_internet: bool,
    /// Only let the guest reach this (repeatable): CIDR, ADDR, CIDR:PORT or
    /// CIDR:LO-HI. Implies --no-internet for everything else.
    #[arg(long, value_name = "CIDR[:PORT]", value_parser = parse_egress_rule)]
    pub allow: Vec<String>,
    /// Never let the guest reach this (repeatable).
    #[arg(long, value_name = "CIDR[:PORT]", value_parser = parse_egress_rule)]
    pub deny: Vec<String>,
}

#[derive(Debug, Args)]
pub struct EditArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Set or clear keep-hot.
    #[arg(long, value_name = "true|false")]
    pub keep_hot: Option<bool>,
    /// Add or change a label (repeatable).
    #[arg(short, long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Remove a label (repeatable).
    #[arg(long = "remove-label", value_name = "KEY")]
    pub remove_labels: Vec<String>,
    /// Remove all labels (before applying --label).
    #[arg(long)]
    pub clear_labels: bool,
    /// A new name (sibling sandboxes resolve it at once).
    #[arg(long, visible_alias = "name", value_name = "NAME", value_parser = parse_name)]
    pub rename: Option<String>,
    /// Replace the egress policy: nothing leaves (but --allow).
    #[arg(long, conflicts_with = "internet")]
    pub no_internet: bool,
    /// Replace the egress policy: everything may leave (but --deny).
    #[arg(long)]
    pub internet: bool,
    /// Replace the egress policy: only this may leave (repeatable).
    #[arg(long, value_name = "CIDR[:PORT]", value_parser = parse_egress_rule)]
    pub allow: Vec<String>,
    /// Replace the egress policy: never this (repeatable).
    #[arg(long, value_name = "CIDR[:PORT]", value_parser = parse_egress_rule)]
    pub deny: Vec<String>,
}

fn parse_egress_rule(s: &str) -> std::result::Result<String, String> {
    s.parse::<bhatti::net::egress::EgressRule>()
        .map(|r| r.to_string())
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Environment variable (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Working directory (absolute).
    #[arg(short = 'w', long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(short, long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Start the command and return at once, printing its pid.
    #[arg(short, long)]
    pub detach: bool,
    /// Do not forward stdin even when it is piped.
    #[arg(short = 'n', long)]
    pub no_stdin: bool,
    /// The command and its arguments (after `--`).
    #[arg(required = true, num_args = 1.., trailing_var_arg = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Reattach to this session, replaying what was missed.
    #[arg(short, long, value_name = "ID")]
    pub session: Option<String>,
    /// Replay from this output offset instead of the last one seen here.
    #[arg(long, value_name = "N", requires = "session")]
    pub offset: Option<u64>,
    /// Start a new session even when a detached one could be reattached.
    #[arg(long, conflicts_with = "session")]
    pub new: bool,
    /// Program to run instead of the login shell (new sessions only).
    #[arg(last = true, value_name = "CMD", conflicts_with = "session")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum FileCommand {
    /// Print a file's contents.
    Read(FileReadArgs),
    /// Write a file atomically from a local file or stdin.
    Write(FileWriteArgs),
    /// List a directory.
    Ls(FileLsArgs),
}

#[derive(Debug, Args)]
pub struct FileReadArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Absolute path in the sandbox.
    pub path: String,
    /// First line to print (0-based).
    #[arg(long, value_name = "LINE")]
    pub offset: Option<u64>,
    /// Most lines to print.
    #[arg(long, value_name = "LINES")]
    pub limit: Option<u64>,
    /// Most bytes to print.
    #[arg(long, value_name = "BYTES")]
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Args)]
pub struct FileWriteArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Absolute path in the sandbox.
    pub path: String,
    /// Local file to upload; `-` or absent reads stdin.
    pub local: Option<PathBuf>,
    /// Permission bits in octal, e.g. 0755.
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
}

#[derive(Debug, Args)]
pub struct FileLsArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Absolute directory path in the sandbox.
    #[arg(default_value = "/")]
    pub path: String,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Boot from the disk, ignoring the saved memory.
    #[arg(long)]
    pub fresh: bool,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Checkpoint a sandbox under a name (it keeps running).
    Create {
        /// Sandbox name or id.
        sandbox: String,
        /// Checkpoint name.
        #[arg(value_parser = parse_name, required_unless_present = "name_flag")]
        name: Option<String>,
        /// Checkpoint name, as a flag.
        #[arg(long = "name", id = "name_flag", value_name = "NAME", value_parser = parse_name, conflicts_with = "name")]
        name_flag: Option<String>,
    },
    /// List your checkpoints.
    #[command(visible_alias = "ls")]
    List,
    /// Start a new sandbox from a checkpoint.
    Resume {
        /// Checkpoint name.
        snapshot: String,
        /// The new sandbox's name.
        #[arg(long, value_parser = parse_name)]
        name: Option<String>,
        /// Never pause or snapshot the new sandbox when idle.
        #[arg(long)]
        keep_hot: bool,
    },
    /// Delete a checkpoint.
    #[command(visible_alias = "rm")]
    Delete {
        /// Checkpoint name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an OCI image from a registry into your catalogue (a progress
    /// bar follows the pull; Ctrl-C cancels it).
    Pull {
        /// The reference, e.g. `docker.io/library/python:3.12`.
        #[arg(value_name = "REF")]
        reference: String,
        /// The catalogue name (default: repository and tag, `python:3.12`).
        #[arg(long, value_parser = parse_image_name)]
        name: Option<String>,
        /// Registry user name (with --password-stdin).
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password from stdin.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Read a registry bearer token from stdin.
        #[arg(long, conflicts_with_all = ["username", "password_stdin"])]
        token_stdin: bool,
    },
    /// Import an image tarball (`docker save`, `skopeo copy … docker-archive:`
    /// or `oci-archive:`).
    Import {
        /// The tarball.
        file: PathBuf,
        /// The catalogue name.
        #[arg(long, value_parser = parse_image_name)]
        name: String,
    },
    /// Save a sandbox's disk as an image (the sandbox keeps running).
    Save {
        /// Sandbox name or id.
        sandbox: String,
        /// The image's name.
        #[arg(value_parser = parse_image_name)]
        name: String,
    },
    /// List your images and the shared ones.
    #[command(visible_alias = "ls")]
    List,
    /// Delete one of your images.
    #[command(visible_alias = "rm")]
    Delete {
        /// Image name.
        name: String,
    },
}

fn parse_image_name(s: &str) -> Result<String, String> {
    bhatti::api_types::validate_image_name("name", s)
        .map(|()| s.to_string())
        .map_err(|e| e.message)
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret from --value, stdin, or a prompt (no echo).
    Set {
        /// Name: upper-case letters, digits and '_'.
        #[arg(value_parser = parse_secret_name)]
        name: String,
        /// The value (visible in your shell history; prefer stdin or the prompt).
        #[arg(long)]
        value: Option<String>,
    },
    /// List your secrets (never their values).
    #[command(visible_alias = "ls")]
    List,
    /// Delete a secret.
    #[command(visible_alias = "rm")]
    Delete {
        /// Secret name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// Where the daemon's configuration is.
#[derive(Debug, Clone, Args)]
pub struct HostArgs {
    /// Daemon config file (TOML). Default: BHATTI_CONFIG, else
    /// /etc/bhatti/config.toml when it exists, else built-in defaults.
    #[arg(long, env = "BHATTI_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user and print its API key (shown only this once).
    Create {
        #[command(flatten)]
        host: HostArgs,
        /// User name.
        #[arg(long, value_parser = parse_name)]
        name: String,
        /// Most sandboxes at once (default: the config's [limits]).
        #[arg(long, value_name = "N")]
        max_sandboxes: Option<u32>,
        /// Most vCPUs per sandbox.
        #[arg(long, value_name = "N")]
        max_cpus: Option<u32>,
        /// Most memory per sandbox, MiB.
        #[arg(long, value_name = "MB")]
        max_memory: Option<u32>,
        /// Most checkpoints kept.
        #[arg(long, value_name = "N")]
        max_snapshots: Option<u32>,
        /// Their sandboxes cannot reach each other (default: the config's
        /// network.isolate_sandboxes).
        #[arg(long, value_name = "true|false")]
        isolate: Option<bool>,
    },
    /// Whether a user's sandboxes can reach each other (applies with their
    /// next create, or at the daemon's next start).
    Isolate {
        #[command(flatten)]
        host: HostArgs,
        /// User name.
        name: String,
        /// true: isolated; false: not; default: the config's.
        #[arg(value_name = "true|false|default")]
        value: String,
    },
    /// List users.
    #[command(visible_alias = "ls")]
    List {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Delete a user (refused while it has sandboxes or checkpoints).
    #[command(visible_alias = "rm")]
    Delete {
        #[command(flatten)]
        host: HostArgs,
        /// User name.
        name: String,
    },
    /// Issue a new API key; the old one stops working at once.
    RotateKey {
        #[command(flatten)]
        host: HostArgs,
        /// User name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// The daemon's health, users and sandboxes at a glance (exit 1 when
    /// the daemon does not answer).
    Status {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Print a daemon config file with every key at its default, commented.
    ExampleConfig,
    /// Every user's events, read from the daemon's database (newest last).
    Events(AdminEventsArgs),
}

#[derive(Debug, Args)]
pub struct AdminEventsArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Only this user's (name).
    #[arg(long)]
    pub user: Option<String>,
    /// Only this sandbox (id).
    #[arg(long)]
    pub sandbox: Option<String>,
    /// Only these kinds (comma-separated).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_event_types)]
    pub kind: Option<String>,
    /// At most this many, the newest.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
}

/// A sandbox, checkpoint or user name, checked before anything is sent.
pub fn parse_name(s: &str) -> Result<String, String> {
    bhatti::api_types::validate_name("name", s)
        .map(|()| s.to_string())
        .map_err(|e| e.message)
}

fn parse_secret_name(s: &str) -> Result<String, String> {
    bhatti::secrets::validate_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.message)
}

/// `KEY=VALUE` (the value may contain `=` and be empty).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Octal permission bits: `644`, `0644` or `0o644`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() => Ok(m),
        _ => Err(format!(
            "expected octal permission bits such as 0644, got {s:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bhatti").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_everything_after_dashes() {
        let cli = parse(&["exec", "dev", "--", "sh", "-c", "exit 7"]).unwrap();
        let Command::Exec(e) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(e.sandbox, "dev");
        assert_eq!(e.cmd, ["sh", "-c", "exit 7"]);
        // Flags after the command belong to the command.
        let cli = parse(&["exec", "-e", "A=1=2", "dev", "ls", "-l", "--json"]).unwrap();
        let Command::Exec(e) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(e.cmd, ["ls", "-l", "--json"]);
        assert_eq!(e.env, [("A".to_string(), "1=2".to_string())]);
        assert!(!cli.global.json);
        assert!(parse(&["exec", "dev"]).is_err());
    }

    #[test]
    fn volume_backup_commands() {
        assert!(parse(&["volume", "backup", "src", "--wait"]).is_ok());
        assert!(parse(&["volume", "backups", "src"]).is_ok());
        assert!(parse(&["volume", "restore", "src", "id-1", "--into", "new"]).is_ok());
        assert!(parse(&["volume", "restore", "src", "id-1", "--into", "Bad"]).is_err());
        assert!(parse(&["volume", "backup-rm", "src", "id-1"]).is_ok());
        assert!(parse(&["volume", "schedule", "src", "0 3 * * *", "--keep", "7"]).is_ok());
        assert!(parse(&["volume", "schedule", "src", "--off"]).is_ok());
        assert!(parse(&["volume", "schedule", "src"]).is_ok());
        assert!(parse(&["volume", "schedule", "src", "@daily", "--off"]).is_err());
        assert!(parse(&["volume", "schedule", "src", "--keep", "3"]).is_err());
    }

    #[test]
    fn global_flags_anywhere() {
        let cli = parse(&["list", "--json", "--url", "http://h:1"]).unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.url.as_deref(), Some("http://h:1"));
        let cli = parse(&["--json", "snapshot", "list"]).unwrap();
        assert!(cli.global.json);
    }

    #[test]
    fn names_are_checked_locally() {
        let e = parse(&["create", "Bad_Name"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(parse(&["create", "good-1"]).is_ok());
        assert!(parse(&["create"]).is_ok());
        assert!(parse(&["snapshot", "create", "dev", "x y"]).is_err());
        assert!(parse(&["user", "create", "--name", "-x"]).is_err());
        assert!(parse(&["secret", "set", "lower"]).is_err());
        assert!(parse(&["secret", "set", "GITHUB_TOKEN"]).is_ok());
    }

    #[test]
    fn key_values_and_modes() {
        assert_eq!(parse_key_value("a=").unwrap(), ("a".into(), "".into()));
        assert!(parse_key_value("=a").is_err());
        assert!(parse_key_value("a").is_err());
        assert_eq!(parse_mode("0755").unwrap(), 0o755);
        assert_eq!(parse_mode("0o600").unwrap(), 0o600);
        assert!(parse_mode("9").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("77777").is_err());
    }

    #[test]
    fn user_create_flags() {
        let cli = parse(&[
            "user",
            "create",
            "--name",
            "alice",
            "--max-sandboxes",
            "3",
            "--max-memory",
            "2048",
            "--json",
            "--config",
            "/tmp/c.toml",
        ])
        .unwrap();
        let Command::User(UserCommand::Create {
            host,
            name,
            max_sandboxes,
            max_memory,
            ..
        }) = cli.command
        else {
            panic!("not user create")
        };
        assert_eq!(name, "alice");
        assert_eq!((max_sandboxes, max_memory), (Some(3), Some(2048)));
        assert_eq!(host.config.unwrap(), PathBuf::from("/tmp/c.toml"));
        assert!(cli.global.json);
        assert!(parse(&["user", "create", "--name", "a", "--max-cpus", "x"]).is_err());
    }

    #[test]
    fn documented_forms() {
        let cli = parse(&[
            "create",
            "--name",
            "x",
            "--disk-size",
            "4096",
            "--env",
            "A=1,B=2",
            "-e",
            "C=a,b",
            "--file",
            "./local:/guest/path",
            "--label",
            "k=v",
            "--memory",
            "1024",
        ])
        .unwrap();
        let Command::Create(c) = cli.command else {
            panic!("not create")
        };
        assert_eq!((c.name, c.name_flag.as_deref()), (None, Some("x")));
        assert_eq!(c.disk, Some(4096));
        let env: Vec<(String, String)> = c.env.into_iter().flat_map(|kv| kv.0).collect();
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(env, [kv("A", "1"), kv("B", "2"), kv("C", "a,b")]);
        assert_eq!(
            c.files,
            [FileSpec {
                local: PathBuf::from("./local"),
                guest: "/guest/path".into(),
                mode: None
            }]
        );
        assert!(parse(&["create", "a", "--name", "b"]).is_err());
        assert!(parse(&["create", "--file", "local:relative"]).is_err());
        assert_eq!(
            parse_file_spec("./a:b:/etc/x:0600"),
            Ok(FileSpec {
                local: PathBuf::from("./a:b"),
                guest: "/etc/x".into(),
                mode: Some(0o600)
            })
        );
        assert_eq!(
            parse_file_spec("l:/etc/a:b").map(|f| (f.guest, f.mode)),
            Ok(("/etc/a:b".to_string(), None))
        );
        for bad in ["l:/etc/x:999", "l:/proc/x", "l:/a/../b", "l:/a//b", ":/x"] {
            assert!(parse_file_spec(bad).is_err(), "{bad}");
        }
        assert!(parse(&["create", "--env", ",A=1"]).is_err());
        let cli = parse(&["snapshot", "create", "sb", "--name", "cp"]).unwrap();
        let Command::Snapshot(SnapshotCommand::Create { name_flag, .. }) = cli.command else {
            panic!("not snapshot create")
        };
        assert_eq!(name_flag.as_deref(), Some("cp"));
        assert!(parse(&["snapshot", "create", "sb"]).is_err());
        assert!(parse(&["destroy", "x", "-y"]).is_ok());
        assert!(parse(&["destroy", "x", "--yes"]).is_ok());
        assert!(parse(&["list", "--label", "k=v"]).is_ok());
        assert!(parse(&["list", "--label", "k"]).is_err());
        let cli = parse(&["edit", "x", "--name", "new"]).unwrap();
        let Command::Edit(e) = cli.command else {
            panic!("not edit")
        };
        assert_eq!(e.rename.as_deref(), Some("new"));
        assert!(parse(&["shell", "x", "--new"]).is_ok());
        assert!(parse(&["shell", "x", "--new", "--session", "s"]).is_err());
        assert!(parse(&["kill", "x", "s1"]).is_ok());
        assert!(parse(&["kill", "x", "s1", "--signal", "0"]).is_err());
    }

    #[test]
    fn shell_and_files() {
        let cli = parse(&["shell", "dev", "--session", "s1"]).unwrap();
        let Command::Shell(s) = cli.command else {
            panic!("not shell")
        };
        assert_eq!(s.session.as_deref(), Some("s1"));
        assert!(parse(&["shell", "dev", "--offset", "5"]).is_err());
        let cli = parse(&["shell", "dev", "--", "top"]).unwrap();
        let Command::Shell(s) = cli.command else {
            panic!("not shell")
        };
        assert_eq!(s.cmd, ["top"]);
        let cli = parse(&["file", "write", "dev", "/x", "--mode", "600"]).unwrap();
        let Command::File(FileCommand::Write(w)) = cli.command else {
            panic!("not file write")
        };
        assert_eq!((w.local, w.mode), (None, Some(0o600)));
        assert!(parse(&["start", "dev", "--fresh"]).is_ok());
        assert!(parse(&["completion", "zsh"]).is_ok());
        assert!(parse(&["completion", "tcsh"]).is_err());
    }
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only this sandbox.
    pub sandbox: Option<String>,
    /// Only these kinds (comma-separated), e.g. `wake,wake_failed`.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_event_types)]
    pub kind: Option<String>,
    /// Only events after this id (a previous answer's last id).
    #[arg(long, value_name = "ID")]
    pub since: Option<u64>,
    /// At most this many per request (1 to 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Keep polling (about every second) and print new events until Ctrl-C;
    /// with --json, one JSON object per line.
    #[arg(short, long)]
    pub follow: bool,
}

/// `a,b`: event types, each checked.
pub fn parse_event_types(s: &str) -> Result<String, String> {
    bhatti::api_types::parse_event_types(s)
        .map(|v| v.join(","))
        .map_err(|e| e.message)
}
