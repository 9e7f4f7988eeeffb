//! `bhatti serve`: the daemon.
//!
//! [`serve`] opens the data dir (SQLite store, secrets identity), picks the
//! VMM backend (host probe + `[vm] backend`), starts the engine and
//! re-adopts what a previous daemon left ([`reconcile`]), then serves the
//! API on the unix socket (mode 0666: every request is authenticated by
//! its API key, so the socket itself need not be restricted) and on the
//! optional TCP address until `shutdown` resolves.
//!
//! Shutdown: stop accepting, give in-flight requests [`SHUTDOWN_GRACE`],
//! then close every agent connection (ending shells and streams). VMs keep
//! running; the next daemon adopts them.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use bhatti_vmm::probe::BackendPref;
use bhatti_vmm::{BackendKind, VmmBackend};

use crate::api::{self, AppState};
use crate::config::{Backend, Config, LogFormat};
use crate::engine::{Engine, EngineConfig, SandboxState};
use crate::net::egress::EgressPolicy;
use crate::net::firewall::FirewallSettings;
use crate::net::tenants::{TenantSandbox, TenantSettings, TenantUser, Tenants};
use crate::net::NetSettings;
use crate::secrets::SecretBox;
use crate::store::Store;

/// How long in-flight requests may run on after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Io { context, source }
}

/// Sets up logging from `[log]` (`RUST_LOG` wins). Does nothing when a
/// global subscriber exists already (tests, an embedding program).
pub fn init_tracing(cfg: &crate::config::LogConfig) {
    // hickory logs every DNS query at info: keep it to warnings unless the
    // configured filter names it.
    let level = if cfg.level.contains("hickory") {
        cfg.level.clone()
    } else {
        format!(
            "{},hickory_server=warn,hickory_proto=warn,hickory_resolver=warn",
            cfg.level
        )
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The daemon's async runtime. With one thread (the default) it is tokio's
/// current-thread scheduler: the same single thread without the
/// work-stealing machinery, which measurably shortens every request (see
/// the README's performance section). More threads: the multi-thread one.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("bhatti")
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .thread_name("bhatti")
            .build()
    }
}

/// The backend `[vm]` asks for, as the host allows.
pub fn backend(config: &Config) -> Result<Arc<dyn VmmBackend>, DaemonError> {
    let cfg = &config.vm;
    let host = bhatti_vmm::probe::probe();
    let pref = match cfg.backend {
        Backend::Auto => BackendPref::Auto,
        Backend::Firecracker => BackendPref::Firecracker,
        Backend::Qemu => BackendPref::Qemu,
    };
    let kind = host.choose(pref).map_err(DaemonError::Setup)?;
    match kind {
        BackendKind::Qemu => {
            let binary = cfg
                .qemu_bin
                .components()
                .nth(1)
                .is_some()
                .then(|| cfg.qemu_bin.clone());
            let b = bhatti_vmm::qemu::QemuBackend::new(bhatti_vmm::qemu::QemuConfig {
                binary,
                accel: cfg.qemu_accel.into(),
                extra_args: Vec::new(),
            })
            .map_err(|e| DaemonError::Setup(format!("the QEMU backend: {e}")))?
            .with_confinement(bhatti_vmm::qemu::confine::Confinement {
                run_as: (!cfg.vmm_user.is_empty()).then(|| cfg.vmm_user.clone()),
                sandbox: cfg.qemu_sandbox,
                cgroups: cfg.cgroups.then(|| bhatti_vmm::cgroup::CgroupConfig {
                    root: cfg.cgroup_root.clone(),
                }),
            })
            .map_err(|e| {
                DaemonError::Setup(format!(
                    "confining QEMU ([vm] vmm_user, qemu_sandbox, cgroups): {e}"
                ))
            })?;
            tracing::info!(accel = ?b.accel(), confinement = ?b.confinement(), "backend qemu");
            Ok(Arc::new(b))
        }
        BackendKind::Firecracker => {
            // A bare name means "look it up" (BHATTI_FIRECRACKER, then PATH).
            let binary = cfg
                .firecracker_bin
                .components()
                .nth(1)
                .is_some()
                .then(|| cfg.firecracker_bin.clone());
            let b = bhatti_vmm::firecracker::FirecrackerBackend::new(
                bhatti_vmm::firecracker::FirecrackerConfig {
                    binary,
                    seccomp: cfg.firecracker_seccomp,
                    jailer: cfg.firecracker_jailer.then(|| {
                        let user = (!cfg.vmm_user.is_empty())
                            .then(|| nix::unistd::User::from_name(&cfg.vmm_user).ok().flatten())
                            .flatten();
                        bhatti_vmm::firecracker::JailerConfig {
                            uid: user.as_ref().map(|u| u.uid.as_raw()),
                            gid: user.as_ref().map(|u| u.gid.as_raw()),
                            chroot_base: config.data_dir.join("jail"),
                            parent_cgroup: cfg.cgroup_root.clone(),
                            ..Default::default()
                        }
                    }),
                    ..Default::default()
                },
            )
            .map_err(|e| DaemonError::Setup(format!("the Firecracker backend: {e}")))?;
            tracing::info!(seccomp = cfg.firecracker_seccomp, "backend firecracker");
            Ok(Arc::new(b))
        }
    }
}

/// Runs the daemon until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    init_tracing(&config.log);
    let backend = backend(&config)?;
    serve_with_backend(config, backend, shutdown).await
}

/// [`serve`] with a VMM backend chosen by the caller (benchmarks, tests);
/// `[vm] backend` is then not consulted.
pub async fn serve_with_backend(
    config: Config,
    backend: Arc<dyn VmmBackend>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    init_tracing(&config.log);
    std::fs::create_dir_all(&config.data_dir)
        .map_err(io(format!("creating {}", config.data_dir.display())))?;
    let _ = std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700));
    let store = Store::open(config.db_path())?;
    // Volume backups cut off by a crash (their uploads never completed).
    let interrupted = store
        .run(|c| crate::store::backups::fail_interrupted(c))
        .await?;
    if interrupted > 0 {
        tracing::warn!(backups = interrupted, "marked interrupted backups failed");
    }
    // [backups]: an unreadable secret fails the start, not the first backup.
    let backup_client = crate::backups::BackupStore::from_config(&config.backups)
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    // Consistent copies of backups a crash cut off.
    let _ = std::fs::remove_dir_all(config.data_dir.join("backup-copies"));
    let secrets = SecretBox::load_or_create(&config.data_dir)?;
    let kind = backend.kind();
    let mut ecfg = EngineConfig::new(
        &config.data_dir,
        &config.vm.kernel,
        &config.vm.rootfs,
        backend,
    );
    // Sandboxes get their owner's network; the engine's own default bridge
    // only serves records from before per-user networks.
    ecfg.net = config.network.enabled.then(|| NetSettings {
        netns: config.network.netns.clone(),
        ..NetSettings::default()
    });
    ecfg.disk_strategy = config.vm.disk_strategy.into();
    ecfg.xfs_loop_size_mb = config.vm.xfs_loop_size_mb;
    ecfg.boot_timeout = Duration::from_secs(config.vm.boot_timeout_secs);
    ecfg.agent_timeout = Duration::from_secs(config.vm.agent_timeout_secs);
    ecfg.kernel_args = config.vm.kernel_args.clone();
    ecfg.secrets = Some(Arc::new(crate::secrets::StoredSecrets {
        store: store.clone(),
        secrets: SecretBox::load_or_create(&config.data_dir)?,
    }));
    // Bridges and rules before the engine re-adopts VMs (their TAPs join
    // those bridges).
    let tenants = if config.network.enabled {
        Some(Arc::new(start_tenants(&config, &store).await?))
    } else {
        None
    };
    let engine = Engine::new(ecfg).await?;
    let recovered = engine.recover().await?;
    tracing::info!(sandboxes = recovered.len(), "engine recovered");
    reconcile(&store, &engine, tenants.as_deref()).await?;
    engine
        .collect_orphans(Some(&config.data_dir.join("checkpoints")))
        .await;
    if let Some(t) = &tenants {
        let known: std::collections::HashSet<String> =
            engine.list().into_iter().filter_map(|s| s.tap).collect();
        t.remove_orphan_taps(&known).await;
    }

    // Listeners before anything is announced.
    let unix = bind_unix(&config.listen_unix)?;
    let tcp = match config.listen_tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("listening on {addr}")))?,
        ),
        None => None,
    };
    let public_tls =
        crate::proxy::public::tls_config(&config.proxy.tls_cert, &config.proxy.tls_key)
            .map_err(|e| DaemonError::Setup(format!("proxy TLS: {e}")))?;
    let public = match config.proxy.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("listening on {addr} (proxy.listen)")))?,
        ),
        None => None,
    };
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("listening on {addr} (metrics.listen)")))?,
        ),
        None => None,
    };
    let e2b_listener = match config.e2b.listen.filter(|_| config.e2b.enabled) {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("listening on {addr} (e2b.listen)")))?,
        ),
        None => None,
    };
    // Thermal transitions are counted on their way to the store.
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let thermal = crate::thermal::ThermalManager::spawn(
        engine.clone(),
        Some(Arc::new(crate::metrics::records::Metered {
            inner: Arc::new(store.clone()),
            metrics: metrics.clone(),
            engine: engine.clone(),
        })),
        &config.thermal,
    );
    let prebooted = if config.vm.prebooted {
        let p = crate::prebooted::Prebooted::new(
            &config.data_dir.join("checkpoints"),
            engine.clone(),
            store.clone(),
            tenants.clone(),
            config.network.default_egress,
            // The agent images get: part of every snapshot's key.
            Some(config.images.lohar.clone()).filter(|p| p.is_file()),
        )
        .await
        .map_err(io("loading the pre-booted snapshots".to_string()))?;
        p.collect_stale();
        Some(p)
    } else {
        None
    };
    let mut app_state = AppState::new(
        engine.clone(),
        store,
        secrets,
        config.clone(),
        kind,
        thermal.handle(),
        tenants,
    );
    app_state.prebooted = prebooted;
    app_state.metrics = metrics;
    app_state.backups = crate::backups::Backups::new(app_state.store.clone(), backup_client);
    let state = Arc::new(app_state);
    state.events.record_start(&recovered).await;
    let pruner = state.events.spawn_pruner();
    let schedules_stop = tokio_util::sync::CancellationToken::new();
    let schedules = tokio::spawn(crate::backups::schedule::run_loop(
        state.store.clone(),
        Arc::new(api::ScheduledVolumeBackup(state.clone())),
        schedules_stop.clone(),
        Duration::from_secs(30),
    ));
    state
        .images
        .start(&config)
        .await
        .map_err(|e| DaemonError::Setup(format!("images: {e}")))?;
    state.images_changed().await;
    // Every template's snapshot, built where missing (kernel, lohar or
    // image changed).
    {
        let st = state.clone();
        tokio::spawn(async move {
            let rows = match st
                .store
                .run(|c| crate::store::templates::list(c, None))
                .await
            {
                Ok(r) => r,
                Err(e) => return tracing::warn!("listing templates: {e}"),
            };
            for r in rows {
                crate::api::ensure_prebooted(&st, &r.owner, &r.spec).await;
            }
        });
    }
    let app = api::router(state.clone());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    {
        let app = app.clone();
        let stop = stopped(stop_rx.clone());
        servers.spawn(async move { axum::serve(unix, app).with_graceful_shutdown(stop).await });
    }
    if let Some(tcp) = tcp {
        let stop = stopped(stop_rx.clone());
        servers.spawn(async move { axum::serve(tcp, app).with_graceful_shutdown(stop).await });
    }
    if let Some(l) = metrics_listener {
        let stop = stopped(stop_rx.clone());
        let app = api::metrics_router(state.clone());
        servers.spawn(async move { axum::serve(l, app).with_graceful_shutdown(stop).await });
    }
    if let Some(l) = e2b_listener {
        let stop = stopped(stop_rx.clone());
        let app = api::e2b::listener_router(state.clone());
        servers.spawn(async move { axum::serve(l, app).with_graceful_shutdown(stop).await });
    }
    // E2B sandboxes' end of life (timeouts), also when the API is off.
    let e2b_reaper = api::e2b::spawn_reaper(state.clone());
    if let Some(public) = public {
        let stop = stopped(stop_rx.clone());
        let app = crate::proxy::public::router(state.clone());
        servers.spawn(async move {
            crate::proxy::public::serve(public, app, public_tls, stop, SHUTDOWN_GRACE).await;
            Ok(())
        });
    }
    let sweeper = {
        let st = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                st.rate.retain_recent();
                st.proxy.retain_recent();
                st.images_changed().await;
            }
        })
    };
    tracing::info!(
        unix = %config.listen_unix.display(),
        tcp = ?config.listen_tcp,
        public = ?config.proxy.listen,
        metrics = ?config.metrics.listen,
        e2b = ?config.e2b.listen,
        backend = %kind,
        "bhatti daemon listening"
    );

    shutdown.await;
    tracing::info!("shutting down: no new connections");
    // No sandbox is paused or snapshotted while the daemon goes away; a
    // cool-down already under way finishes.
    thermal.shutdown().await;
    let _ = stop_tx.send(true);
    // Relayed WebSockets would hold the listeners open: end them.
    state.proxy.stop.cancel();
    sweeper.abort();
    pruner.abort();
    e2b_reaper.abort();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    // Pulls stop (their work dirs go); mutations whose clients left still
    // finish (a create, a stop).
    state.images.tasks.cancel_all();
    // A scheduled backup under way is cancelled by the backups' shutdown
    // below; the loop starts no new one.
    schedules_stop.cancel();
    state.tasks.close();
    let bound = Duration::from_secs(config.vm.boot_timeout_secs + 30);
    if tokio::time::timeout(bound, state.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("API operations still running after {bound:?}");
    }
    // Uploads in flight abort (nothing is left in the bucket; their rows
    // are marked failed at the next start if not now).
    state.backups.shutdown().await;
    let _ = schedules.await;
    if let Some(p) = &state.prebooted {
        if tokio::time::timeout(bound, p.shutdown()).await.is_err() {
            tracing::warn!("a template build still running after {bound:?}");
        }
    }
    // Waits for engine operations, then ends shells and streams still open;
    // VMs keep running.
    engine.shutdown().await;
    if drained.is_err() {
        tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}; ending them");
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while servers.join_next().await.is_some() {}
        })
        .await;
        servers.abort_all();
    }
    let _ = std::fs::remove_file(&config.listen_unix);
    tracing::info!("daemon stopped; sandboxes keep running");
    Ok(())
}

/// The per-user networks as the store describes them: bridges of users
/// with sandboxes, the full ruleset, DNS servers.
async fn start_tenants(config: &Config, store: &Store) -> Result<Tenants, DaemonError> {
    let net = &config.network;
    for k in net.obsolete_keys() {
        tracing::warn!("ignoring the obsolete config key {k}");
    }
    let egress_interfaces = if net.egress_interface.is_empty() {
        default_route_interface(net.netns.as_deref())
            .await
            .into_iter()
            .collect()
    } else {
        vec![net.egress_interface.clone()]
    };
    if egress_interfaces.is_empty() {
        tracing::warn!("no default route: guests have no way out until one exists (or set network.egress_interface)");
    }
    let settings = TenantSettings {
        pool: net.pool_cidr(),
        netns: net.netns.clone(),
        firewall: FirewallSettings {
            pool: net.pool_cidr(),
            blocked: net.blocked_cidrs(),
            egress_interfaces,
            host_ports: net.guest_host_ports.clone(),
        },
        dns_suffix: net.dns_suffix.clone(),
        dns_port: 53,
        upstreams: net.upstreams(),
        isolate_by_default: net.isolate_sandboxes,
    };
    let (users, rows) = store
        .run(|c| {
            Ok((
                crate::store::users::list(c)?,
                crate::store::sandboxes::list_all(c)?,
            ))
        })
        .await?;
    let by_id: std::collections::HashMap<&str, &crate::store::users::User> =
        users.iter().map(|u| (u.id.as_str(), u)).collect();
    let sandboxes: Vec<TenantSandbox> = rows
        .iter()
        .filter_map(|r| {
            let u = by_id.get(r.owner.as_str())?;
            Some(TenantSandbox {
                id: r.id.clone(),
                name: r.name.clone(),
                user: TenantUser {
                    user_id: u.id.clone(),
                    index: u.net_index,
                    isolated: u.net_isolated,
                },
                ip_host: r.ip_host?,
                egress: r.egress.clone().unwrap_or(EgressPolicy {
                    egress: net.default_egress,
                    ..Default::default()
                }),
            })
        })
        .collect();
    Tenants::start(settings, sandboxes)
        .await
        .map_err(|e| DaemonError::Setup(format!("guest networks: {e}")))
}

/// The interface of the namespace's default IPv4 route, if any.
async fn default_route_interface(netns: Option<&str>) -> Option<String> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-4", "route", "show", "default"]);
    let out = crate::cmd::run("ip", args).await.ok()?;
    // `default via 192.0.2.1 dev eth0 proto dhcp …`
    out.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        words.find(|w| *w == "dev")?;
        words.next().map(str::to_owned)
    })
}

/// Binds the unix socket, replacing a stale one (but not one a live
/// daemon answers on).
fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Setup(format!(
                "another daemon is listening on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(io(format!("removing stale {}", path.display())))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .map_err(io(format!("listening on {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(io(format!("chmod {}", path.display())))?;
    Ok(l)
}

/// Makes the store and the engine agree after a (re)start. A create (or
/// fork) that never finished is rolled back: its VM, files, network and row
/// go, so the client's retry starts afresh (none of it was acknowledged).
/// One the engine got running counts as done. Engine sandboxes without a
/// row (a delete that crashed after its row went) are destroyed.
pub async fn reconcile(
    store: &Store,
    engine: &Engine,
    tenants: Option<&Tenants>,
) -> Result<(), DaemonError> {
    let rows = store.run(|c| crate::store::sandboxes::list_all(c)).await?;
    let users = store.run(|c| crate::store::users::list(c)).await?;
    for row in &rows {
        let state = engine.get(&row.id).ok().map(|sb| sb.state);
        if row.status == "creating"
            && !matches!(state, Some(SandboxState::Running | SandboxState::Paused))
        {
            tracing::warn!(id = %row.id, name = %row.name, "rolling back a create that never finished");
            if let Err(e) = engine.destroy(&row.id).await {
                tracing::warn!(id = %row.id, "{e}");
                continue;
            }
            if let (Some(t), Some(u), Some(ip_host)) = (
                tenants,
                users.iter().find(|u| u.id == row.owner),
                row.ip_host,
            ) {
                let tsb = TenantSandbox {
                    id: row.id.clone(),
                    name: row.name.clone(),
                    user: TenantUser {
                        user_id: u.id.clone(),
                        index: u.net_index,
                        isolated: u.net_isolated,
                    },
                    ip_host,
                    egress: row.egress.clone().unwrap_or_default(),
                };
                if let Err(e) = t.remove_sandbox(&tsb).await {
                    tracing::warn!(id = %row.id, "removing its network: {e}");
                }
            }
            let (o, i) = (row.owner.clone(), row.id.clone());
            store
                .run(move |c| crate::store::sandboxes::delete(c, &o, &i))
                .await?;
            continue;
        }
        let status = match state {
            Some(SandboxState::Failed) if row.status != "failed" => Some("failed"),
            Some(SandboxState::Running | SandboxState::Paused) if row.status == "creating" => {
                Some("running")
            }
            None if row.status != "failed" => {
                tracing::warn!(id = %row.id, name = %row.name, "the engine has no record of this sandbox");
                Some("failed")
            }
            _ => None,
        };
        if let Some(status) = status {
            let (o, i) = (row.owner.clone(), row.id.clone());
            store
                .run(move |c| crate::store::sandboxes::set_status(c, &o, &i, status))
                .await?;
        }
    }
    for sb in engine.list() {
        if !rows.iter().any(|r| r.id == sb.id) {
            tracing::warn!(id = %sb.id, "destroying a sandbox no user owns");
            if let Err(e) = engine.destroy(&sb.id).await {
                tracing::warn!(id = %sb.id, "{e}");
            }
        }
    }
    Ok(())
}
