//! The daemon's configuration: one TOML file (`bhatti serve --config <file>`,
//! or the `BHATTI_CONFIG` environment variable), every key optional with a
//! documented default, unknown keys rejected, and the whole validated at load
//! so a bad value fails the start with a message naming its key.
//!
//! [`Config::example_toml`] renders a fully commented example with every key at
//! its default; a test parses it back and checks it lists every key.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::net::egress::{Cidr, Egress};
pub use crate::thermal::ThermalConfig;

/// The environment variable naming the config file when `--config` is absent.
pub const CONFIG_ENV: &str = "BHATTI_CONFIG";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type
    /// (the message names the key and line).
    #[error("invalid config{}: {message}", path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Parse {
        path: Option<PathBuf>,
        message: String,
    },
    /// A value parsed but is not allowed.
    #[error("invalid config value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding all daemon state: the SQLite database, the secrets
    /// identity, sandboxes' disks and snapshots. Default `/var/lib/bhatti`.
    pub data_dir: PathBuf,
    /// Unix socket the API listens on (the local CLI's default endpoint).
    /// Default `/run/bhatti/bhatti.sock`.
    pub listen_unix: PathBuf,
    /// TCP address the API listens on; an empty string disables TCP.
    /// Default `127.0.0.1:8080`.
    #[serde(with = "opt_addr")]
    pub listen_tcp: Option<SocketAddr>,
    /// Threads of the daemon's async scheduler. The daemon's async work is
    /// I/O-bound (blocking work runs on a separate pool), and waking a task
    /// on another CPU costs tens of microseconds on virtualized hosts, so
    /// one thread (tokio's current-thread scheduler) gives the lowest
    /// request latency; more use the multi-thread scheduler. Default 1.
    pub worker_threads: usize,
    /// Logging.
    pub log: LogConfig,
    /// Virtual machines.
    pub vm: VmConfig,
    /// Guest networking.
    pub network: NetworkConfig,
    /// Idle sandboxes: when they are paused (warm) and snapshotted to disk (cold).
    pub thermal: ThermalConfig,
    /// Default per-user caps and rate limits.
    pub limits: LimitsConfig,
    /// Reaching guests' ports: the authenticated proxy and the public
    /// listener of published ports.
    pub proxy: ProxyConfig,
    /// The web shell's share links.
    pub shell: ShellConfig,
    /// Sandbox images: OCI pulls and imports, saved disks, shared images.
    pub images: ImagesConfig,
    /// Volumes: ext4 disks that outlive sandboxes.
    pub volumes: VolumesConfig,
    /// Volume backups to an S3-compatible object store.
    pub backups: BackupsConfig,
    /// The event log (`GET /events`, `bhatti admin events`): retention.
    pub events: EventsConfig,
    /// `GET /metrics` (Prometheus): who may scrape it, and where.
    pub metrics: MetricsConfig,
    /// The E2B-compatible API (docs/e2b.md).
    pub e2b: E2bConfig,
}

/// `[e2b]`: the E2B-compatible API the official E2B SDKs talk to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct E2bConfig {
    /// Serve it under `/e2b` on the API's listeners (and on `listen`);
    /// false: those routes answer 404 and `listen` is not opened (the
    /// timeouts of existing E2B sandboxes are still enforced). Default true.
    pub enabled: bool,
    /// A separate TCP listener serving the same API at `/` instead of
    /// `/e2b`; an empty string disables it. Default empty.
    #[serde(with = "opt_addr")]
    pub listen: Option<SocketAddr>,
}

impl Default for E2bConfig {
    fn default() -> Self {
        E2bConfig {
            enabled: true,
            listen: None,
        }
    }
}

/// `[metrics]`: off unless a token or a listener is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// A separate TCP listener that serves only `GET /metrics`, without
    /// auth (bind it to loopback or a private network); an empty string
    /// disables it. Default empty.
    #[serde(with = "opt_addr")]
    pub listen: Option<SocketAddr>,
    /// A bearer secret (at least 16 characters) that opens `GET /metrics`
    /// on the API's own listeners; empty: `/metrics` is 404 there.
    /// Default empty.
    pub token: String,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter directive such as `info` or `bhatti=debug,info`;
    /// `RUST_LOG`, when set, wins. Default `info`.
    pub level: String,
    /// `text` (human-readable) or `json` (one object per line). Default `text`.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[vm]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// VMM: `auto` (Firecracker when its binary and KVM are usable, else
    /// QEMU), `firecracker` or `qemu`. Default `auto`.
    pub backend: Backend,
    /// QEMU accelerator: `auto` (KVM when usable, else TCG), `kvm` or `tcg`.
    /// Default `auto`.
    pub qemu_accel: QemuAccel,
    /// Firecracker binary: a path, or a name looked up in `PATH`.
    /// Default `firecracker`.
    pub firecracker_bin: PathBuf,
    /// Run Firecracker with its built-in seccomp filters. Official release
    /// binaries want this; turn it off only for a self-built binary whose
    /// filters do not match its libc. Default true.
    pub firecracker_seccomp: bool,
    /// QEMU binary: a path, or a name looked up in `PATH`.
    /// Default `qemu-system-x86_64`.
    pub qemu_bin: PathBuf,
    /// Guest kernel (uncompressed `vmlinux`); relative paths are under
    /// `data_dir`. Default `images/vmlinux`.
    pub kernel: PathBuf,
    /// Base root filesystem (ext4 image) every sandbox's disk is cloned from;
    /// relative paths are under `data_dir`. Default `images/rootfs.ext4`.
    pub rootfs: PathBuf,
    /// Extra kernel command-line arguments appended for every guest.
    /// Default empty.
    pub kernel_args: String,
    /// Seconds a boot (or restore) may take until the guest agent answers.
    /// Default 60.
    pub boot_timeout_secs: u64,
    /// Seconds a single agent call made by the daemon itself may take.
    /// Default 10.
    pub agent_timeout_secs: u64,
    /// Seconds a create with `wait_init` waits for `init` to end (it then
    /// answers with `init.state` `timed_out`; init runs on). Default 600.
    pub init_wait_timeout_secs: u64,
    /// vCPUs of a sandbox created without `cpus`. Default 1.
    pub default_cpus: u32,
    /// Memory (MiB) of a sandbox created without `memory_mb`. Default 512.
    pub default_memory_mb: u32,
    /// Root disk size (MiB) of a sandbox created without `disk_mb`; 0 keeps
    /// the base image's size. Default 0.
    pub default_disk_mb: u64,
    /// Most vCPUs any sandbox may have, whatever a user's caps. Default 16.
    pub max_cpus: u32,
    /// Most memory (MiB) any sandbox may have. Default 32768.
    pub max_memory_mb: u32,
    /// Largest root disk (MiB) any sandbox may have. Default 102400.
    pub max_disk_mb: u64,
    /// How root disks are cloned: `auto` (reflink, else a loop-mounted XFS
    /// image under `data_dir`, else a sparse copy), `reflink`, `xfs-loop` or
    /// `copy`. Default `auto`.
    pub disk_strategy: DiskStrategy,
    /// Size (MiB, sparse) of the XFS image used by `xfs-loop`. Default 65536.
    pub xfs_loop_size_mb: u64,
    /// The unprivileged user VMM processes run as once they have opened
    /// their devices (QEMU `-runas`/`-run-with user=`; Firecracker's jailer).
    /// Must exist (`scripts/install-deps.sh` creates it). "" keeps the
    /// daemon's user (root). Default `bhatti-vmm`.
    pub vmm_user: String,
    /// QEMU's seccomp filter (`-sandbox on`, spawning and resource control
    /// denied). Default true.
    pub qemu_sandbox: bool,
    /// One cgroup per VMM with limits from the sandbox's size (CPU quota =
    /// its vCPUs, memory = its RAM + 256 MiB, 256 tasks), cgroup v2 or v1.
    /// Default true.
    pub cgroups: bool,
    /// The cgroup (under each hierarchy's root) holding the VMMs' cgroups.
    /// Default `bhatti`.
    pub cgroup_root: String,
    /// Run Firecracker under its jailer (a chroot per VM under
    /// `<data_dir>/jail`, `vmm_user`'s uid/gid, cgroup limits). Needs the
    /// jailer of the same release (next to `firecracker_bin`, or
    /// `BHATTI_JAILER`) and a static Firecracker build, as the official
    /// release binaries are. Default true.
    pub firecracker_jailer: bool,
    /// Keep a pre-booted snapshot of each template (and of each image
    /// sandboxes are created from) and restore it on create instead of
    /// booting ("instant create"). Default true.
    pub prebooted: bool,
}

/// Which VMM runs the sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    #[default]
    Auto,
    Firecracker,
    Qemu,
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QemuAccel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// How per-sandbox root disks are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskStrategy {
    #[default]
    Auto,
    Reflink,
    XfsLoop,
    Copy,
}

impl From<DiskStrategy> for crate::storage::DiskStrategy {
    fn from(s: DiskStrategy) -> Self {
        match s {
            DiskStrategy::Auto => crate::storage::DiskStrategy::Auto,
            DiskStrategy::Reflink => crate::storage::DiskStrategy::Reflink,
            DiskStrategy::XfsLoop => crate::storage::DiskStrategy::XfsLoop,
            DiskStrategy::Copy => crate::storage::DiskStrategy::Copy,
        }
    }
}

impl From<QemuAccel> for bhatti_vmm::qemu::Accel {
    fn from(a: QemuAccel) -> Self {
        match a {
            QemuAccel::Auto => bhatti_vmm::qemu::Accel::Auto,
            QemuAccel::Kvm => bhatti_vmm::qemu::Accel::Kvm,
            QemuAccel::Tcg => bhatti_vmm::qemu::Accel::Tcg,
        }
    }
}

/// `[network]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Give guests a network at all (bridges, TAPs, NAT). Default true.
    pub enabled: bool,
    /// The pool every user's /24 is carved from (by the user's subnet
    /// index); gateway `.1`. Default `10.192.0.0/10` (16384 users).
    pub pool: String,
    /// Network namespace (a name under `/run/netns`) holding the bridges,
    /// TAPs, firewall tables and VMM processes; created when missing.
    /// Default: none (the host's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The interface guest traffic leaves by (masqueraded). Default "": the
    /// default route's interface at startup.
    pub egress_interface: String,
    /// Where the sibling DNS servers send names that are not sandboxes
    /// (`ip` or `ip:port`). Default: the host's `/etc/resolv.conf`
    /// nameservers.
    pub dns_upstreams: Vec<String>,
    /// Sandboxes resolve as `<name>` and `<name>.<suffix>`. Default `sb`.
    pub dns_suffix: String,
    /// Egress of a sandbox created without a `network` policy: "allow"
    /// (everything but the blocked ranges) or "deny". Default "allow".
    pub default_egress: Egress,
    /// One user's sandboxes cannot reach each other, unless the user's own
    /// setting says otherwise. Default false.
    pub isolate_sandboxes: bool,
    /// Destinations guests can never reach, whatever their policy.
    /// Default: RFC 1918, 100.64/10, 169.254/16, 127/8, 0/8, multicast and
    /// 240/4.
    pub blocked_ranges: Vec<String>,
    /// TCP ports on a user's gateway that guests may reach besides DNS.
    /// Default none.
    pub guest_host_ports: Vec<u16>,
    /// Keys of configs written before per-user networks (one shared bridge):
    /// accepted so an upgrade starts, ignored with a warning.
    #[serde(default, skip_serializing)]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing)]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing)]
    pub dns: Option<Vec<IpAddr>>,
}

impl NetworkConfig {
    /// Keys that are read but no longer mean anything.
    pub fn obsolete_keys(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.bridge.is_some() {
            v.push("network.bridge (each user has a bridge now)");
        }
        if self.subnet.is_some() {
            v.push("network.subnet (see network.pool)");
        }
        if self.dns.is_some() {
            v.push("network.dns (guests ask their gateway; see network.dns_upstreams)");
        }
        v
    }

    /// The configured upstreams, or the host's resolv.conf ones.
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        if self.dns_upstreams.is_empty() {
            return crate::net::dns::host_upstreams();
        }
        self.dns_upstreams
            .iter()
            .filter_map(|s| parse_upstream(s).ok())
            .collect()
    }

    pub fn pool_cidr(&self) -> Cidr {
        self.pool.parse().unwrap_or_else(|_| {
            "10.192.0.0/10"
                .parse()
                .expect("the built-in pool is a valid network")
        })
    }

    pub fn blocked_cidrs(&self) -> Vec<Cidr> {
        self.blocked_ranges
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }
}

/// `ip` (port 53) or `ip:port` / `[v6]:port`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("`{s}` is not an address or address:port"))
}

/// `[proxy]`: `ANY /sandboxes/{id}/proxy/{port}/…` (authenticated) and the
/// public listener that serves published ports without auth, by host
/// (`<alias>.<zone>`) and by path (`/<alias>/…`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address of the public listener; an empty string disables it (ports
    /// can still be published, and reached through the authenticated
    /// proxy). Default empty.
    #[serde(with = "opt_addr")]
    pub listen: Option<SocketAddr>,
    /// DNS zone whose names route to published ports: `<alias>.<zone>`
    /// (a wildcard record points at this host). Empty: routing by path
    /// only. Default empty.
    pub zone: String,
    /// Base URL printed for published ports (e.g. `https://sb.example.com`);
    /// empty: derived from `zone` and `listen`. Default empty.
    pub public_url: String,
    /// PEM certificate chain for TLS on the public listener; with `tls_key`.
    /// Empty: plain HTTP. Default empty.
    pub tls_cert: String,
    /// PEM private key of `tls_cert`. Default empty.
    pub tls_key: String,
    /// Largest request body passed to a guest (past it: 413). Default 100 MiB.
    pub max_body_bytes: u64,
    /// Seconds a proxied connection may go without a byte either way before
    /// it is closed (also the wait for a response's headers). Default 300.
    pub idle_timeout_secs: u64,
    /// Requests per second one client address may make to the public
    /// listener; 0: unlimited. Default 50.
    pub per_ip_per_second: u32,
    /// Burst above `per_ip_per_second`. Default 100.
    pub per_ip_burst: u32,
    /// Requests per second one published alias may receive; 0: unlimited.
    /// Default 200.
    pub per_alias_per_second: u32,
    /// Burst above `per_alias_per_second`. Default 400.
    pub per_alias_burst: u32,
    /// Cold sandboxes the public listener may be waking at once; a request
    /// that would wake one more is answered 503 with `Retry-After`.
    /// Default 4.
    pub max_cold_wakes: u32,
    /// Published ports one user may have. Default 20.
    pub max_published_per_user: u32,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: None,
            zone: String::new(),
            public_url: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            max_body_bytes: 100 << 20,
            idle_timeout_secs: 300,
            per_ip_per_second: 50,
            per_ip_burst: 100,
            per_alias_per_second: 200,
            per_alias_burst: 400,
            max_cold_wakes: 4,
            max_published_per_user: 20,
        }
    }
}

/// `[limits]`: defaults for users created without explicit caps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sandboxes one user may have at once (past it: 429). Default 10.
    pub max_sandboxes: u32,
    /// vCPUs per sandbox for one user (past it: 400). Default 4.
    pub max_cpus: u32,
    /// Memory (MiB) per sandbox for one user (past it: 400). Default 4096.
    pub max_memory_mb: u32,
    /// Named checkpoints one user may keep. Default 20.
    pub max_snapshots: u32,
    /// Bytes of checkpoints (memory snapshot and disk copy, apparent
    /// sizes) one user may keep; a checkpoint reserves its VM's memory plus
    /// disk size before it is taken (past it: 429). Default 64 GiB.
    pub max_snapshot_bytes: u64,
    /// Bytes of stdout, and of stderr, a buffered exec answer holds (for
    /// everyone, not per user); the command runs to its end and the rest
    /// of its output is dropped (`stdout_truncated` / `stderr_truncated`).
    /// Streamed execs are not limited. Default 10 MiB.
    pub exec_output_max_bytes: u64,
    /// Per-user request rate limits.
    pub rate: RateConfig,
}

/// `[shell]`: links that open a sandbox's terminal in a browser
/// (`bhatti share`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShellConfig {
    /// Seconds a share link works after it is made (1 to 2592000, 30 days).
    /// Default 3600.
    pub token_ttl_secs: u64,
    /// The daemon's address as browsers reach it, e.g.
    /// `https://bhatti.example.com`; share links are made absolute with it.
    /// Empty: links are paths, and the CLI puts its own endpoint in front.
    /// Default empty.
    pub public_url: String,
}

/// `[images]`: the image catalogue (`docs/images.md`). Images live under
/// `<data_dir>/images/` (blob cache, disks, work dirs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    /// The static lohar binary put into every image made from an OCI image
    /// (it is the guest's init and agent). Default `/usr/local/bin/lohar`
    /// (where `scripts/install.sh` installs it).
    pub lohar: PathBuf,
    /// Images one user may keep (past it: 429). Default 20.
    pub max_per_user: u32,
    /// Bytes of image disks (apparent sizes) one user may keep (past it:
    /// 429). Default 20 GiB.
    pub max_bytes_per_user: u64,
    /// Largest tarball `POST /images/import` accepts (past it: 413).
    /// Default 10 GiB.
    pub max_import_bytes: u64,
    /// Whether users may pull images from registries (`POST /images/pull`,
    /// a create naming a reference not yet pulled). Off: only shared and
    /// imported images; a pull answers 403, such a create 404. Default
    /// true.
    pub allow_pull: bool,
    /// Shared images every user can create sandboxes from: name → ext4
    /// disk (with lohar installed). The `[vm] rootfs` is always shared as
    /// `minimal`. Default none.
    pub shared: std::collections::BTreeMap<String, PathBuf>,
}

/// `[volumes]`: volumes (`docs/volumes.md`), kept as
/// `<data_dir>/volumes/<user id>/<volume id>.ext4`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumesConfig {
    /// Bytes of volumes (their sizes, ephemeral ones included) one user may
    /// have (past it: 429). Default 50 GiB.
    pub max_bytes_per_user: u64,
}

impl Default for VolumesConfig {
    fn default() -> Self {
        VolumesConfig {
            max_bytes_per_user: 50 << 30,
        }
    }
}

/// `[events]`: how long the event log keeps events. Pruned at start, every
/// `prune_interval_secs` and after every 1000 inserts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Events older than this many days go. Default 30.
    pub max_age_days: u32,
    /// At most this many events are kept (the newest). Default 100000.
    pub max_count: u32,
    /// Seconds between prunes. Default 600.
    pub prune_interval_secs: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            max_age_days: 30,
            max_count: 100_000,
            prune_interval_secs: 600,
        }
    }
}

/// `[backups]`: volume backups to an S3-compatible object store
/// (`docs/backups.md`). An empty `endpoint` turns backups off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupsConfig {
    /// The store's URL, e.g. `https://s3.eu-central-1.amazonaws.com` or
    /// `http://127.0.0.1:9000`; `http://` only for loopback addresses.
    /// Empty: backups are off. Default empty.
    pub endpoint: String,
    /// The bucket backups go to (it must exist). Default empty.
    pub bucket: String,
    /// The region requests are signed for. Default `us-east-1`.
    pub region: String,
    /// Access key id. Default empty.
    pub access_key_id: String,
    /// Secret access key. The environment variable
    /// `BHATTI_BACKUPS_SECRET_ACCESS_KEY` wins over it, and
    /// `secret_access_key_file` over both. Default empty.
    pub secret_access_key: String,
    /// A file holding the secret access key (trailing whitespace ignored).
    /// Default empty.
    pub secret_access_key_file: String,
    /// Key prefix in the bucket: backups are
    /// `<prefix>/<owner>/<volume>/<id>.ext4.zst` plus `<id>.json`.
    /// Default `bhatti`.
    pub prefix: String,
    /// Path-style requests (`<endpoint>/<bucket>/<key>`) instead of
    /// virtual-hosted ones; always on for loopback and IP-address
    /// endpoints. Default false.
    pub path_style: bool,
    /// Size of one multipart-upload part in MiB (5 to 5120); a backup holds
    /// about five parts in memory. Default 8.
    pub part_size_mb: u64,
    /// zstd level (1 to 19). Default 3.
    pub compression_level: i32,
    /// zstd worker threads; 0 compresses on the backup's own thread.
    /// Default 0.
    pub compression_threads: u32,
}

impl Default for BackupsConfig {
    fn default() -> Self {
        BackupsConfig {
            endpoint: String::new(),
            bucket: String::new(),
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            secret_access_key_file: String::new(),
            prefix: "bhatti".into(),
            path_style: false,
            part_size_mb: 8,
            compression_level: 3,
            compression_threads: 0,
        }
    }
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig {
            lohar: PathBuf::from("/usr/local/bin/lohar"),
            max_per_user: 20,
            max_bytes_per_user: 20 << 30,
            max_import_bytes: 10 << 30,
            allow_pull: true,
            shared: Default::default(),
        }
    }
}

/// `[limits.rate]`: token buckets per user and request class; a rate of 0
/// disables that class's limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateConfig {
    /// Sandbox creates, starts, stops, checkpoints and resumes per minute.
    /// Default 60.
    pub create_per_minute: u32,
    /// Burst allowed above `create_per_minute`. Default 10.
    pub create_burst: u32,
    /// Execs, shells, file writes and other guest-touching calls per second.
    /// Default 100.
    pub exec_per_second: u32,
    /// Burst allowed above `exec_per_second`. Default 200.
    pub exec_burst: u32,
    /// Reads (list, get, file reads) per second. Default 200.
    pub read_per_second: u32,
    /// Burst allowed above `read_per_second`. Default 400.
    pub read_burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/bhatti"),
            listen_unix: PathBuf::from("/run/bhatti/bhatti.sock"),
            listen_tcp: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            worker_threads: 1,
            log: LogConfig::default(),
            vm: VmConfig::default(),
            network: NetworkConfig::default(),
            thermal: ThermalConfig::default(),
            limits: LimitsConfig::default(),
            proxy: ProxyConfig::default(),
            shell: ShellConfig::default(),
            images: ImagesConfig::default(),
            volumes: VolumesConfig::default(),
            backups: BackupsConfig::default(),
            events: EventsConfig::default(),
            metrics: MetricsConfig::default(),
            e2b: E2bConfig::default(),
        }
    }
}

impl Default for ShellConfig {
    fn default() -> Self {
        ShellConfig {
            token_ttl_secs: 3600,
            public_url: String::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            backend: Backend::Auto,
            qemu_accel: QemuAccel::Auto,
            firecracker_bin: PathBuf::from("firecracker"),
            firecracker_seccomp: true,
            qemu_bin: PathBuf::from("qemu-system-x86_64"),
            kernel: PathBuf::from("images/vmlinux"),
            rootfs: PathBuf::from("images/rootfs.ext4"),
            kernel_args: String::new(),
            boot_timeout_secs: 60,
            agent_timeout_secs: 10,
            init_wait_timeout_secs: 600,
            default_cpus: 1,
            default_memory_mb: 512,
            default_disk_mb: 0,
            max_cpus: 16,
            max_memory_mb: 32768,
            max_disk_mb: 102_400,
            disk_strategy: DiskStrategy::Auto,
            xfs_loop_size_mb: 65536,
            vmm_user: bhatti_vmm::qemu::confine::VMM_USER.into(),
            qemu_sandbox: true,
            cgroups: true,
            cgroup_root: "bhatti".into(),
            firecracker_jailer: true,
            prebooted: true,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            enabled: true,
            pool: "10.192.0.0/10".into(),
            netns: None,
            egress_interface: String::new(),
            dns_upstreams: Vec::new(),
            dns_suffix: "sb".into(),
            default_egress: Egress::Allow,
            isolate_sandboxes: false,
            blocked_ranges: crate::net::egress::default_blocked_ranges()
                .iter()
                .map(ToString::to_string)
                .collect(),
            guest_host_ports: Vec::new(),
            bridge: None,
            subnet: None,
            dns: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sandboxes: 10,
            max_cpus: 4,
            max_memory_mb: 4096,
            max_snapshots: 20,
            exec_output_max_bytes: 10 << 20,
            max_snapshot_bytes: 64 << 30,
            rate: RateConfig::default(),
        }
    }
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            create_per_minute: 60,
            create_burst: 10,
            exec_per_second: 100,
            exec_burst: 200,
            read_per_second: 200,
            read_burst: 400,
        }
    }
}

/// `listen_tcp` as a string: an address, or empty for none.
mod opt_addr {
    use std::net::SocketAddr;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.serialize_str(&a.to_string()),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|_| {
            D::Error::custom(format!(
                "`{s}` is not an IP address and port such as 127.0.0.1:8080 (empty disables TCP)"
            ))
        })
    }
}

impl VmConfig {
    /// The hard bounds requests are checked against.
    pub fn size_bounds(&self) -> crate::api_types::SizeBounds {
        crate::api_types::SizeBounds {
            max_cpus: self.max_cpus,
            max_memory_mb: self.max_memory_mb,
            max_disk_mb: self.max_disk_mb,
        }
    }
}

impl Config {
    /// Loads the config: `path` when given, else the file named by
    /// `BHATTI_CONFIG`, else all defaults. Relative `kernel`/`rootfs` paths are
    /// resolved under `data_dir`, then everything is validated.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env_path = std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        match path.map(Path::to_path_buf).or(env_path) {
            Some(p) => Config::from_file(&p),
            None => {
                let mut c = Config::default();
                c.resolve();
                c.validate()?;
                Ok(c)
            }
        }
    }

    /// Reads, parses, resolves and validates one file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: Some(path.to_path_buf()),
                message,
            },
            other => other,
        })
    }

    /// Parses, resolves and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: None,
            message: e.to_string().trim_end().to_string(),
        })?;
        c.resolve();
        c.validate()?;
        Ok(c)
    }

    /// Makes relative image paths absolute under `data_dir`.
    pub fn resolve(&mut self) {
        for p in [&mut self.vm.kernel, &mut self.vm.rootfs] {
            if p.is_relative() {
                *p = self.data_dir.join(&*p);
            }
        }
    }

    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.data_dir.is_absolute() {
            return Err(invalid("data_dir", "must be an absolute path"));
        }
        if !self.listen_unix.is_absolute() {
            return Err(invalid("listen_unix", "must be an absolute path"));
        }
        // sockaddr_un.sun_path is 108 bytes including the NUL.
        if self.listen_unix.as_os_str().len() > 107 {
            return Err(invalid(
                "listen_unix",
                "is longer than a unix socket path may be (107 bytes)",
            ));
        }
        if self.worker_threads == 0 || self.worker_threads > 256 {
            return Err(invalid("worker_threads", "must be between 1 and 256"));
        }
        let ev = &self.events;
        if ev.max_age_days == 0 || ev.max_age_days > 36_500 {
            return Err(invalid(
                "events.max_age_days",
                "must be between 1 and 36500",
            ));
        }
        if ev.max_count == 0 {
            return Err(invalid("events.max_count", "must be at least 1"));
        }
        if ev.prune_interval_secs == 0 || ev.prune_interval_secs > 86_400 {
            return Err(invalid(
                "events.prune_interval_secs",
                "must be between 1 and 86400",
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty (e.g. \"info\")"));
        }
        let vm = &self.vm;
        for (key, p) in [
            ("vm.firecracker_bin", &vm.firecracker_bin),
            ("vm.qemu_bin", &vm.qemu_bin),
        ] {
            if p.as_os_str().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        for (key, p) in [("vm.kernel", &vm.kernel), ("vm.rootfs", &vm.rootfs)] {
            if p.as_os_str().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if vm.boot_timeout_secs == 0 || vm.boot_timeout_secs > 3600 {
            return Err(invalid(
                "vm.boot_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        if vm.agent_timeout_secs == 0 || vm.agent_timeout_secs > 3600 {
            return Err(invalid(
                "vm.agent_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        if vm.init_wait_timeout_secs == 0 || vm.init_wait_timeout_secs > 86_400 {
            return Err(invalid(
                "vm.init_wait_timeout_secs",
                "must be between 1 and 86400",
            ));
        }
        if vm.max_cpus == 0 || vm.max_cpus > crate::engine::MAX_CPUS {
            return Err(invalid(
                "vm.max_cpus",
                format!("must be between 1 and {}", crate::engine::MAX_CPUS),
            ));
        }
        if vm.default_cpus == 0 || vm.default_cpus > vm.max_cpus {
            return Err(invalid(
                "vm.default_cpus",
                format!("must be between 1 and vm.max_cpus ({})", vm.max_cpus),
            ));
        }
        let min_mem = crate::engine::MIN_MEMORY_MB;
        if vm.max_memory_mb < min_mem || vm.max_memory_mb > crate::engine::MAX_MEMORY_MB {
            return Err(invalid(
                "vm.max_memory_mb",
                format!(
                    "must be between {min_mem} and {}",
                    crate::engine::MAX_MEMORY_MB
                ),
            ));
        }
        if vm.default_memory_mb < min_mem || vm.default_memory_mb > vm.max_memory_mb {
            return Err(invalid(
                "vm.default_memory_mb",
                format!(
                    "must be between {min_mem} and vm.max_memory_mb ({})",
                    vm.max_memory_mb
                ),
            ));
        }
        let (min_disk, max_disk) = (crate::engine::MIN_DISK_MB, crate::engine::MAX_DISK_MB);
        if vm.max_disk_mb < min_disk || vm.max_disk_mb > max_disk {
            return Err(invalid(
                "vm.max_disk_mb",
                format!("must be between {min_disk} and {max_disk}"),
            ));
        }
        if vm.default_disk_mb != 0 && vm.default_disk_mb < min_disk {
            return Err(invalid(
                "vm.default_disk_mb",
                format!("must be 0 (image size) or at least {min_disk}"),
            ));
        }
        if vm.default_disk_mb > vm.max_disk_mb {
            return Err(invalid(
                "vm.default_disk_mb",
                format!(
                    "must be 0 (image size) or at most vm.max_disk_mb ({})",
                    vm.max_disk_mb
                ),
            ));
        }
        let plain = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if vm.vmm_user.len() > 32 || !plain(&vm.vmm_user) || vm.vmm_user == "root" {
            return Err(invalid(
                "vm.vmm_user",
                "must be a user name (not root), or \"\" to keep the daemon's user",
            ));
        }
        if vm.cgroup_root.is_empty()
            || vm.cgroup_root.starts_with('/')
            || vm
                .cgroup_root
                .split('/')
                .any(|c| c.is_empty() || c == ".." || !plain(c))
        {
            return Err(invalid(
                "vm.cgroup_root",
                "must be a relative cgroup path such as \"bhatti\"",
            ));
        }
        if vm.xfs_loop_size_mb < 512 {
            return Err(invalid("vm.xfs_loop_size_mb", "must be at least 512"));
        }
        let net = &self.network;
        let pool: Cidr = net.pool.parse().map_err(|m| invalid("network.pool", m))?;
        if !(8..=24).contains(&pool.prefix) {
            return Err(invalid(
                "network.pool",
                "must be a network from /8 to /24 (it is split into one /24 per user)",
            ));
        }
        if !net.egress_interface.is_empty()
            && (net.egress_interface.len() > 15
                || !net
                    .egress_interface
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'))
        {
            return Err(invalid(
                "network.egress_interface",
                "must be a Linux interface name (1-15 of letters, digits, '-', '_', '.') or \"\"",
            ));
        }
        for u in &net.dns_upstreams {
            let a = parse_upstream(u).map_err(|m| invalid("network.dns_upstreams", m))?;
            if let std::net::IpAddr::V4(v4) = a.ip() {
                if pool.contains(v4) {
                    // A gateway forwarding to a gateway: a query loop.
                    return Err(invalid(
                        "network.dns_upstreams",
                        format!("{u} lies inside network.pool {pool}"),
                    ));
                }
            }
        }
        if net.dns_suffix.is_empty()
            || net.dns_suffix.len() > 63
            || !net
                .dns_suffix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                "network.dns_suffix",
                "must be one DNS label: 1-63 of a-z, 0-9 and '-'",
            ));
        }
        for r in &net.blocked_ranges {
            let c: Cidr = r
                .parse()
                .map_err(|m| invalid("network.blocked_ranges", m))?;
            if c.overlaps(&pool) && c.prefix >= pool.prefix {
                // A range inside the pool would cut users off their own DNS.
                return Err(invalid(
                    "network.blocked_ranges",
                    format!("{c} lies inside network.pool {pool}"),
                ));
            }
        }
        if net.guest_host_ports.contains(&0) {
            return Err(invalid("network.guest_host_ports", "0 is not a port"));
        }
        if let Some(ns) = &net.netns {
            if ns.is_empty() || ns.contains('/') || ns == "." || ns == ".." || ns.len() > 64 {
                return Err(invalid(
                    "network.netns",
                    "must be a plain name (no '/'), 1-64 characters",
                ));
            }
        }
        let t = &self.thermal;
        if t.warm_after_secs != 0
            && t.cold_after_secs != 0
            && t.cold_after_secs <= t.warm_after_secs
        {
            return Err(invalid(
                "thermal.cold_after_secs",
                format!(
                    "must be greater than thermal.warm_after_secs ({})",
                    t.warm_after_secs
                ),
            ));
        }
        if t.sweep_interval_ms < 10 || t.sweep_interval_ms > 600_000 {
            return Err(invalid(
                "thermal.sweep_interval_ms",
                "must be between 10 and 600000",
            ));
        }
        let p = &self.proxy;
        if p.tls_cert.is_empty() != p.tls_key.is_empty() {
            return Err(invalid(
                "proxy.tls_cert",
                "tls_cert and tls_key must be given together",
            ));
        }
        if !p.zone.is_empty() && crate::proxy::alias::validate_zone(&p.zone).is_err() {
            return Err(invalid(
                "proxy.zone",
                "must be a DNS name such as sb.example.com",
            ));
        }
        let web_url = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        if !p.public_url.is_empty() && !web_url(&p.public_url) {
            return Err(invalid(
                "proxy.public_url",
                "must start with http:// or https://",
            ));
        }
        if p.idle_timeout_secs == 0 || p.idle_timeout_secs > 86_400 {
            return Err(invalid(
                "proxy.idle_timeout_secs",
                "must be between 1 and 86400",
            ));
        }
        if p.max_body_bytes == 0 {
            return Err(invalid("proxy.max_body_bytes", "must be at least 1"));
        }
        if p.max_cold_wakes == 0 {
            return Err(invalid("proxy.max_cold_wakes", "must be at least 1"));
        }
        let l = &self.limits;
        if l.max_cpus == 0 || l.max_cpus > vm.max_cpus {
            return Err(invalid(
                "limits.max_cpus",
                format!("must be between 1 and vm.max_cpus ({})", vm.max_cpus),
            ));
        }
        if l.max_memory_mb < crate::engine::MIN_MEMORY_MB || l.max_memory_mb > vm.max_memory_mb {
            return Err(invalid(
                "limits.max_memory_mb",
                format!(
                    "must be between {} and vm.max_memory_mb ({})",
                    crate::engine::MIN_MEMORY_MB,
                    vm.max_memory_mb
                ),
            ));
        }
        if l.exec_output_max_bytes == 0 || l.exec_output_max_bytes > 1 << 30 {
            return Err(invalid(
                "limits.exec_output_max_bytes",
                "must be between 1 and 1073741824 (1 GiB)",
            ));
        }
        let r = &l.rate;
        for (key, rate, burst) in [
            (
                "limits.rate.create_burst",
                r.create_per_minute,
                r.create_burst,
            ),
            ("limits.rate.exec_burst", r.exec_per_second, r.exec_burst),
            ("limits.rate.read_burst", r.read_per_second, r.read_burst),
        ] {
            if rate != 0 && burst == 0 {
                return Err(invalid(key, "must be at least 1 when its rate is not 0"));
            }
        }
        let sh = &self.shell;
        if sh.token_ttl_secs == 0 || sh.token_ttl_secs > 30 * 86_400 {
            return Err(invalid(
                "shell.token_ttl_secs",
                "must be between 1 and 2592000 (30 days)",
            ));
        }
        let im = &self.images;
        if !im.lohar.is_absolute() {
            return Err(invalid("images.lohar", "must be an absolute path"));
        }
        if im.max_import_bytes == 0 {
            return Err(invalid("images.max_import_bytes", "must be at least 1"));
        }
        for (name, path) in &im.shared {
            if crate::api_types::validate_image_name("images.shared", name).is_err()
                || name == crate::images::MINIMAL
            {
                return Err(invalid(
                    "images.shared",
                    format!(
                        "{name:?} is not an image name (1-128 of a-z, 0-9, '.', '_', ':', '-'; \"{}\" is the [vm] rootfs)",
                        crate::images::MINIMAL
                    ),
                ));
            }
            if !path.is_absolute() {
                return Err(invalid(
                    "images.shared",
                    format!("the path of {name:?} must be absolute"),
                ));
            }
        }
        crate::backups::validate_config(&self.backups).map_err(|(key, m)| invalid(key, m))?;
        let m = &self.metrics;
        if !m.token.is_empty()
            && (m.token.len() < 16 || !m.token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "metrics.token",
                "must be empty or at least 16 printable characters without spaces",
            ));
        }
        if let Some(a) = m.listen {
            if a.port() != 0 && (Some(a) == self.listen_tcp || Some(a) == self.proxy.listen) {
                return Err(invalid(
                    "metrics.listen",
                    format!("{a} is already listen_tcp or proxy.listen"),
                ));
            }
        }
        if let Some(a) = self.e2b.listen {
            if a.port() != 0
                && (Some(a) == self.listen_tcp
                    || Some(a) == self.proxy.listen
                    || Some(a) == m.listen)
            {
                return Err(invalid(
                    "e2b.listen",
                    format!("{a} is already listen_tcp, proxy.listen or metrics.listen"),
                ));
            }
        }
        let u = &sh.public_url;
        if !u.is_empty()
            && (!(u.starts_with("http://") || u.starts_with("https://"))
                || u.chars().any(|c| c.is_whitespace() || c == '#' || c == '?'))
        {
            return Err(invalid(
                "shell.public_url",
                "must be empty or an http:// or https:// URL without query or fragment",
            ));
        }
        Ok(())
    }

    /// The SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("bhatti.db")
    }

    /// A fully commented example config with every key at its default; it
    /// parses back to [`Config::default`].
    pub fn example_toml() -> String {
        let d = Config::default();
        let (v, n, t, l) = (&d.vm, &d.network, &d.thermal, &d.limits);
        let r = &l.rate;
        let path = |p: &Path| toml_str(&p.to_string_lossy());
        let mut e = Example::default();
        e.c("bhatti daemon configuration (`bhatti serve --config <file>` or BHATTI_CONFIG).");
        e.c("Every key is optional; the values below are the defaults. Unknown keys are errors.");
        e.blank();
        e.c("All daemon state: database, secrets identity, sandbox disks and snapshots.");
        e.kv("data_dir", path(&d.data_dir));
        e.c("Unix socket for the API (the local CLI's default endpoint).");
        e.kv("listen_unix", path(&d.listen_unix));
        e.c("TCP address for the API; \"\" disables TCP.");
        let tcp = d.listen_tcp.map(|a| a.to_string()).unwrap_or_default();
        e.kv("listen_tcp", toml_str(&tcp));
        e.c("Async scheduler threads; 1 (the current-thread scheduler) keeps a request on one CPU; blocking work has its own pool.");
        e.kv("worker_threads", d.worker_threads);

        e.table("log");
        e.c("Tracing filter directive, e.g. \"info\" or \"bhatti=debug,info\"; RUST_LOG wins when set.");
        e.kv("level", toml_str(&d.log.level));
        e.c("\"text\" or \"json\" (one object per line).");
        e.kv("format", "\"text\"");

        e.table("vm");
        e.c("\"auto\" (Firecracker when its binary and KVM are usable, else QEMU), \"firecracker\" or \"qemu\".");
        e.kv("backend", "\"auto\"");
        e.c("QEMU accelerator: \"auto\" (KVM when usable, else TCG: slow, for CI/dev), \"kvm\" or \"tcg\".");
        e.kv("qemu_accel", "\"auto\"");
        e.c("VMM binaries: a path, or a name looked up in PATH.");
        e.kv("firecracker_bin", path(&v.firecracker_bin));
        e.kv("qemu_bin", path(&v.qemu_bin));
        e.c("Firecracker's seccomp filters; off only for self-built binaries whose filters don't fit their libc.");
        e.kv("firecracker_seccomp", v.firecracker_seccomp);
        e.c("Guest kernel (vmlinux) and base rootfs (ext4); relative paths are under data_dir.");
        e.kv("kernel", path(&v.kernel));
        e.kv("rootfs", path(&v.rootfs));
        e.c("Extra kernel command-line arguments for every guest.");
        e.kv("kernel_args", toml_str(&v.kernel_args));
        e.c("Seconds a boot or restore may take until the guest agent answers.");
        e.kv("boot_timeout_secs", v.boot_timeout_secs);
        e.c("Seconds one agent call made by the daemon itself may take.");
        e.kv("agent_timeout_secs", v.agent_timeout_secs);
        e.c("Seconds a create with wait_init waits for init to end.");
        e.kv("init_wait_timeout_secs", v.init_wait_timeout_secs);
        e.c("Size of a sandbox created without cpus / memory_mb / disk_mb (disk 0 = the image's size).");
        e.kv("default_cpus", v.default_cpus);
        e.kv("default_memory_mb", v.default_memory_mb);
        e.kv("default_disk_mb", v.default_disk_mb);
        e.c("Hard maxima for any sandbox, whatever a user's caps.");
        e.kv("max_cpus", v.max_cpus);
        e.kv("max_memory_mb", v.max_memory_mb);
        e.kv("max_disk_mb", v.max_disk_mb);
        e.c("Root disk cloning: \"auto\" (reflink, else a loop-mounted XFS image, else a sparse copy),");
        e.c("\"reflink\", \"xfs-loop\" or \"copy\".");
        e.kv("disk_strategy", "\"auto\"");
        e.c("Sparse size (MiB) of the XFS image used by xfs-loop.");
        e.kv("xfs_loop_size_mb", v.xfs_loop_size_mb);
        e.c("VMMs drop to this user after opening their devices (\"\" = stay root).");
        e.kv("vmm_user", toml_str(&v.vmm_user));
        e.c("QEMU's seccomp filter (-sandbox on; spawning and resource control denied).");
        e.kv("qemu_sandbox", v.qemu_sandbox);
        e.c("One cgroup per VMM, limits from the sandbox's size; under cgroup_root.");
        e.kv("cgroups", v.cgroups);
        e.kv("cgroup_root", toml_str(&v.cgroup_root));
        e.c("Firecracker under its jailer: chroot per VM in <data_dir>/jail, vmm_user, cgroups.");
        e.kv("firecracker_jailer", v.firecracker_jailer);
        e.c("Keep a pre-booted snapshot per template (and image) and restore it on create.");
        e.kv("prebooted", v.prebooted);

        e.table("network");
        e.c("Give guests a network (a bridge and /24 per user, firewall, NAT, sibling DNS).");
        e.kv("enabled", n.enabled);
        e.c("Pool split into one /24 per user (gateway .1); /10 holds 16384 users.");
        e.kv("pool", toml_str(&n.pool));
        e.c("Network namespace (under /run/netns) for bridges, TAPs, rules and VMMs; default: the host's.");
        e.c("netns = \"bhatti\"");
        e.c("Interface guest traffic is masqueraded out of; \"\" = the default route's.");
        e.kv("egress_interface", toml_str(&n.egress_interface));
        e.c("Upstream resolvers for names that are not sandboxes (\"ip\" or \"ip:port\"); [] = the host's resolv.conf.");
        e.kv("dns_upstreams", "[]");
        e.c("Sandboxes resolve as <name> and <name>.<dns_suffix> for their owner's other sandboxes.");
        e.kv("dns_suffix", toml_str(&n.dns_suffix));
        e.c("Egress of sandboxes created without a policy: \"allow\" or \"deny\".");
        e.kv("default_egress", toml_str(&n.default_egress.to_string()));
        e.c("One user's sandboxes cannot reach each other (a user's own setting wins).");
        e.kv("isolate_sandboxes", n.isolate_sandboxes);
        e.c("Destinations no guest can reach, whatever its policy.");
        let blocked: Vec<String> = n.blocked_ranges.iter().map(|a| toml_str(a)).collect();
        e.kv("blocked_ranges", format!("[{}]", blocked.join(", ")));
        e.c("TCP ports on the gateway that guests may reach besides DNS.");
        e.kv("guest_host_ports", "[]");

        e.table("thermal");
        e.c("Idle seconds before a sandbox is paused (warm); 0 never pauses.");
        e.kv("warm_after_secs", t.warm_after_secs);
        e.c("Idle seconds before it is snapshotted to disk and its VMM ended (cold); 0 never.");
        e.kv("cold_after_secs", t.cold_after_secs);
        e.c("How often (ms) the idle sweeper runs.");
        e.kv("sweep_interval_ms", t.sweep_interval_ms);

        e.table("limits");
        e.c("Defaults for users created without explicit caps (`bhatti user create --max-…`).");
        e.c("Sandboxes one user may have at once (past it: HTTP 429).");
        e.kv("max_sandboxes", l.max_sandboxes);
        e.c("vCPUs and memory (MiB) per sandbox (past them: HTTP 400).");
        e.kv("max_cpus", l.max_cpus);
        e.kv("max_memory_mb", l.max_memory_mb);
        e.c("Named checkpoints one user may keep.");
        e.kv("max_snapshots", l.max_snapshots);
        e.c("Bytes of stdout, and of stderr, a buffered exec answer holds (for everyone); the command");
        e.c("runs to its end and the rest is dropped (stdout_truncated/stderr_truncated). Streamed execs are not limited.");
        e.kv("exec_output_max_bytes", l.exec_output_max_bytes);
        e.c("Bytes of checkpoints one user may keep (a checkpoint reserves memory + disk size first).");
        e.kv("max_snapshot_bytes", l.max_snapshot_bytes);

        e.table("limits.rate");
        e.c("Per-user token buckets by request class; a rate of 0 disables that class's limit.");
        e.c("create: creates, starts, stops, checkpoints, resumes (per minute).");
        e.kv("create_per_minute", r.create_per_minute);
        e.kv("create_burst", r.create_burst);
        e.c("exec: execs, shells, file writes and other calls that touch the guest (per second).");
        e.kv("exec_per_second", r.exec_per_second);
        e.kv("exec_burst", r.exec_burst);
        e.c("read: list, get, file reads (per second).");
        e.kv("read_per_second", r.read_per_second);
        e.kv("read_burst", r.read_burst);

        e.table("shell");
        e.c("Web shell share links (`bhatti share`): seconds a link works (at most 30 days).");
        e.kv("token_ttl_secs", d.shell.token_ttl_secs);
        e.c("The daemon's address as browsers reach it (e.g. \"https://bhatti.example.com\");");
        e.c("\"\" = links are paths and the CLI puts its own endpoint in front.");
        e.kv("public_url", toml_str(&d.shell.public_url));

        let p = &d.proxy;
        e.table("proxy");
        e.c("Public listener for published ports (no auth; by host <alias>.<zone> and by path /<alias>/);");
        e.c("\"\" disables it (the authenticated /sandboxes/{id}/proxy/{port}/ route always works).");
        let listen = p.listen.map(|a| a.to_string()).unwrap_or_default();
        e.kv("listen", toml_str(&listen));
        e.c("DNS zone whose names route to published ports (a wildcard record points here); \"\" = by path only.");
        e.kv("zone", toml_str(&p.zone));
        e.c("Base URL printed for published ports; \"\" = derived from zone and listen.");
        e.kv("public_url", toml_str(&p.public_url));
        e.c("PEM certificate chain and key for TLS on the public listener; \"\" = plain HTTP.");
        e.kv("tls_cert", toml_str(&p.tls_cert));
        e.kv("tls_key", toml_str(&p.tls_key));
        e.c("Largest request body passed to a guest (413 past it).");
        e.kv("max_body_bytes", p.max_body_bytes);
        e.c("Seconds a proxied connection may move no byte before it is closed (also the wait for response headers).");
        e.kv("idle_timeout_secs", p.idle_timeout_secs);
        e.c("Token buckets of the public listener per client address and per alias (429 past them; 0 = unlimited).");
        e.kv("per_ip_per_second", p.per_ip_per_second);
        e.kv("per_ip_burst", p.per_ip_burst);
        e.kv("per_alias_per_second", p.per_alias_per_second);
        e.kv("per_alias_burst", p.per_alias_burst);
        e.c("Cold sandboxes the public listener may wake at once (503 with Retry-After past it).");
        e.kv("max_cold_wakes", p.max_cold_wakes);
        e.c("Published ports one user may have.");
        e.kv("max_published_per_user", p.max_published_per_user);

        let im = &d.images;
        e.table("images");
        e.c("The static lohar binary put into images made from OCI images (their init and agent).");
        e.kv("lohar", path(&im.lohar));
        e.c("Images one user may keep, and their disks' bytes (past them: HTTP 429).");
        e.kv("max_per_user", im.max_per_user);
        e.kv("max_bytes_per_user", im.max_bytes_per_user);
        e.c("Largest tarball POST /images/import accepts (past it: HTTP 413).");
        e.kv("max_import_bytes", im.max_import_bytes);
        e.c("Whether users may pull images from registries (off: only shared and imported ones).");
        e.kv("allow_pull", im.allow_pull);
        e.c("Shared images every user can create sandboxes from: name = ext4 disk with lohar.");
        e.c("[vm] rootfs is always shared as \"minimal\". scripts/install.sh adds the dev tier:");
        e.c("[images.shared]");
        e.c("dev = \"/var/lib/bhatti/images/rootfs-dev.ext4\"");

        e.table("volumes");
        e.c("Bytes of volumes (their sizes, ephemeral ones included) one user may have (past it: HTTP 429).");
        e.kv("max_bytes_per_user", d.volumes.max_bytes_per_user);
        let ev = &d.events;
        e.table("events");
        e.c("The event log (GET /events, bhatti admin events): events older than max_age_days,");
        e.c("and all but the newest max_count, are pruned every prune_interval_secs.");
        e.kv("max_age_days", ev.max_age_days);
        e.kv("max_count", ev.max_count);
        e.kv("prune_interval_secs", ev.prune_interval_secs);
        let b = &d.backups;
        e.table("backups");
        e.c("Volume backups to an S3-compatible store (docs/backups.md); endpoint \"\" = off.");
        e.c("The store's URL, e.g. \"https://s3.eu-central-1.amazonaws.com\"; http:// only for loopback.");
        e.kv("endpoint", toml_str(&b.endpoint));
        e.c("The bucket (it must exist) and the region requests are signed for.");
        e.kv("bucket", toml_str(&b.bucket));
        e.kv("region", toml_str(&b.region));
        e.c("Credentials; BHATTI_BACKUPS_SECRET_ACCESS_KEY wins over secret_access_key,");
        e.c("and secret_access_key_file (a file holding the secret) over both.");
        e.kv("access_key_id", toml_str(&b.access_key_id));
        e.kv("secret_access_key", toml_str(&b.secret_access_key));
        e.kv(
            "secret_access_key_file",
            toml_str(&b.secret_access_key_file),
        );
        e.c("Objects are <prefix>/<owner>/<volume>/<id>.ext4.zst and <id>.json.");
        e.kv("prefix", toml_str(&b.prefix));
        e.c("Path-style requests (<endpoint>/<bucket>/<key>); always on for loopback and IP endpoints.");
        e.kv("path_style", b.path_style);
        e.c("Multipart part size in MiB (5 to 5120); a backup holds about five parts in memory.");
        e.kv("part_size_mb", b.part_size_mb);
        e.c("zstd level (1 to 19) and worker threads (0 = on the backup's own thread).");
        e.kv("compression_level", b.compression_level);
        e.kv("compression_threads", b.compression_threads);
        let m = &d.metrics;
        e.table("metrics");
        e.c("GET /metrics in the Prometheus (OpenMetrics) text format; off by default.");
        e.c(
            "A listener serving only /metrics, without auth, e.g. \"127.0.0.1:9464\"; \"\" = none.",
        );
        e.kv(
            "listen",
            toml_str(&m.listen.map(|a| a.to_string()).unwrap_or_default()),
        );
        e.c("A bearer secret (16+ characters) for /metrics on the API's listeners; \"\" = 404 there.");
        e.kv("token", toml_str(&m.token));
        let x = &d.e2b;
        e.table("e2b");
        e.c("The E2B-compatible API (docs/e2b.md): the official E2B SDKs, with E2B_API_URL and");
        e.c("E2B_SANDBOX_URL set to http(s)://<listen_tcp>/e2b, drive bhatti sandboxes.");
        e.c("false: the /e2b routes answer 404.");
        e.kv("enabled", x.enabled);
        e.c("A listener serving the same API at / instead of /e2b, e.g. \"127.0.0.1:3000\"; \"\" = none.");
        e.kv(
            "listen",
            toml_str(&x.listen.map(|a| a.to_string()).unwrap_or_default()),
        );
        e.0
    }
}

/// Builds the example file line by line.
#[derive(Default)]
struct Example(String);

impl Example {
    /// A comment line.
    fn c(&mut self, text: &str) {
        let _ = writeln!(self.0, "# {text}");
    }
    fn kv(&mut self, key: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{key} = {value}");
    }
    fn blank(&mut self) {
        self.0.push('\n');
    }
    fn table(&mut self, name: &str) {
        let _ = writeln!(self.0, "\n[{name}]");
    }
}

/// A TOML basic string literal.
fn toml_str(v: &str) -> String {
    toml::Value::String(v.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved_default() -> Config {
        let mut c = Config::default();
        c.resolve();
        c
    }

    #[test]
    fn empty_file_is_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, resolved_default());
        assert_eq!(c.vm.kernel, PathBuf::from("/var/lib/bhatti/images/vmlinux"));
        assert_eq!(c.listen_tcp, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.thermal.warm_after_secs, 30);
        assert_eq!(c.thermal.cold_after_secs, 1800);
    }

    #[test]
    fn events_retention_is_checked() {
        let c = Config::parse("[events]\nmax_age_days = 2\nmax_count = 5\n").unwrap();
        assert_eq!((c.events.max_age_days, c.events.max_count), (2, 5));
        for (text, key) in [
            ("[events]\nmax_age_days = 0", "events.max_age_days"),
            ("[events]\nmax_count = 0", "events.max_count"),
            (
                "[events]\nprune_interval_secs = 0",
                "events.prune_interval_secs",
            ),
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn example_parses_back_to_defaults() {
        let ex = Config::example_toml();
        let c = Config::parse(&ex).unwrap_or_else(|e| panic!("{e}\n{ex}"));
        assert_eq!(c, resolved_default());
    }

    /// Every key of the config (as serialized) appears in the example, so the
    /// example (and the docs made from it) cannot fall behind the struct.
    #[test]
    fn example_lists_every_key() {
        let ex = Config::example_toml();
        let mut c = Config::default();
        c.network.netns = Some("x".into());
        let v = toml::Value::try_from(&c).unwrap();
        fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    if v.is_table() {
                        let p = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&p, v, out);
                    } else {
                        out.push((prefix.to_string(), k.clone()));
                    }
                }
            }
        }
        let mut keys = Vec::new();
        walk("", &v, &mut keys);
        assert!(keys.len() > 30, "{keys:?}");
        for (table, key) in keys {
            let header = if table.is_empty() {
                String::new()
            } else {
                format!("[{table}]\n")
            };
            let start = ex
                .find(&header)
                .unwrap_or_else(|| panic!("no [{table}] in example"));
            let section = &ex[start + header.len()..];
            let section = section.split("\n[").next().unwrap();
            assert!(
                section.contains(&format!("\n{key} = "))
                    || section.starts_with(&format!("{key} = "))
                    || section.contains(&format!("# {key} = ")),
                "key {table}.{key} missing from the example"
            );
        }
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            r#"
            data_dir = "/srv/bhatti"
            listen_tcp = ""
            [vm]
            backend = "qemu"
            qemu_accel = "tcg"
            disk_strategy = "xfs-loop"
            kernel = "/boot/vmlinux"
            [network]
            netns = "bh"
            [log]
            format = "json"
            "#,
        )
        .unwrap();
        assert_eq!(c.listen_tcp, None);
        assert_eq!(c.vm.backend, Backend::Qemu);
        assert_eq!(c.vm.qemu_accel, QemuAccel::Tcg);
        assert_eq!(c.vm.disk_strategy, DiskStrategy::XfsLoop);
        assert_eq!(c.vm.kernel, PathBuf::from("/boot/vmlinux"));
        assert_eq!(c.vm.rootfs, PathBuf::from("/srv/bhatti/images/rootfs.ext4"));
        assert_eq!(c.network.netns.as_deref(), Some("bh"));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.db_path(), PathBuf::from("/srv/bhatti/bhatti.db"));
    }

    #[test]
    fn configs_from_before_user_networks_still_load() {
        let c = Config::parse(
            "[network]\nbridge = \"bhatti0\"\nsubnet = \"10.77.0.1/24\"\ndns = [\"1.1.1.1\"]\n",
        )
        .unwrap();
        assert_eq!(c.network.obsolete_keys().len(), 3);
        assert!(Config::default().network.obsolete_keys().is_empty());
        // They are not written back.
        assert!(!toml::to_string(&c).unwrap().contains("subnet"));
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_rejected_naming_them() {
        let e = err("datadir = \"/x\"");
        assert!(e.contains("datadir"), "{e}");
        let e = err("[vm]\ncpus = 2");
        assert!(e.contains("cpus"), "{e}");
        let e = err("[limits.rate]\nfoo = 1");
        assert!(e.contains("foo"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("data_dir = \"relative\"", "data_dir"),
            ("listen_tcp = \"localhost\"", "listen_tcp"),
            ("[metrics]\ntoken = \"short\"", "metrics.token"),
            ("[metrics]\nlisten = \"127.0.0.1:8080\"", "metrics.listen"),
            ("[e2b]\nlisten = \"127.0.0.1:8080\"", "e2b.listen"),
            ("[vm]\nbackend = \"xen\"", "backend"),
            ("[vm]\ndefault_cpus = 0", "vm.default_cpus"),
            ("[vm]\ndefault_cpus = 32", "vm.default_cpus"),
            ("[vm]\ndefault_memory_mb = 10", "vm.default_memory_mb"),
            ("[vm]\nboot_timeout_secs = 0", "vm.boot_timeout_secs"),
            ("[vm]\ndefault_cpus = -1", "default_cpus"),
            ("[network]\npool = \"10.0.0.0\"", "network.pool"),
            ("[network]\npool = \"10.0.0.0/25\"", "network.pool"),
            (
                "[network]\negress_interface = \"a-very-long-interface-name\"",
                "network.egress_interface",
            ),
            (
                "[network]\ndns_upstreams = [\"dns.example\"]",
                "network.dns_upstreams",
            ),
            ("[network]\ndns_suffix = \"a.b\"", "network.dns_suffix"),
            (
                "[network]\nblocked_ranges = [\"10.200.0.0/16\"]",
                "network.blocked_ranges",
            ),
            ("[network]\ndefault_egress = \"maybe\"", "default_egress"),
            ("[network]\nnetns = \"a/b\"", "network.netns"),
            (
                "[thermal]\nwarm_after_secs = 100\ncold_after_secs = 50",
                "thermal.cold_after_secs",
            ),
            ("[limits]\nmax_cpus = 64", "limits.max_cpus"),
            (
                "[limits]\nexec_output_max_bytes = 0",
                "limits.exec_output_max_bytes",
            ),
            ("[limits.rate]\nexec_burst = 0", "limits.rate.exec_burst"),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(
                e.contains(key),
                "{text:?} gave {e:?}, which does not name {key}"
            );
        }
    }

    #[test]
    fn zero_disables_thermal_and_rates() {
        let c = Config::parse("[thermal]\nwarm_after_secs = 0\ncold_after_secs = 60\n[limits.rate]\nexec_per_second = 0\nexec_burst = 0").unwrap();
        assert_eq!(c.thermal.warm_after_secs, 0);
        assert_eq!(c.limits.rate.exec_per_second, 0);
    }

    #[test]
    fn load_reads_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[thermal]\nwarm_after_secs = 5\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.thermal.warm_after_secs, 5);
        let missing = dir.path().join("missing.toml");
        let e = Config::load(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("missing.toml"), "{e}");
        std::fs::write(&p, "[thermal]\nwarm = 5\n").unwrap();
        let e = Config::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("warm"), "{e}");
    }
}
