//! `/sandboxes`: create (fresh or from a checkpoint), list, get, patch,
//! delete, stop, start. The store row says who owns a sandbox and what the
//! user asked for; the engine says what its VM is doing.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{created, ApiError, AppState, AppStateRef, Caller, JsonBody};
use crate::api_types::{
    rfc3339_ms, CreateSandbox, NetworkView, PatchSandbox, SandboxList, SandboxStatus, SandboxView,
    StartRequest, Thermal,
};
use crate::auth::RequestClass;
use crate::engine::{new_sandbox_id, CheckpointMeta, CreateSpec, Sandbox, SandboxState};
use crate::init_session::InitOutcome;
use crate::net::egress::EgressPolicy;
use crate::net::tenants::{TenantSandbox, TenantUser};
use crate::store::sandboxes::{self, NewSandbox, SandboxRow, SandboxUpdate};
use crate::store::users::User;
use crate::store::StoreError;

/// The API's view of a sandbox: its row plus the engine's state (never
/// waits for or wakes the VM).
pub(super) fn view(row: &SandboxRow, sb: Option<&Sandbox>) -> SandboxView {
    let spec_u32 = |k: &str| {
        row.spec
            .get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v.min(u64::from(u32::MAX)) as u32)
    };
    let spec_str = |k: &str| row.spec.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let (status, thermal, error) = match sb {
        None => (
            SandboxStatus::Failed,
            Thermal::Cold,
            Some("the engine has no record of this sandbox".to_string()),
        ),
        Some(sb) => {
            let thermal = match sb.state {
                SandboxState::Running | SandboxState::Creating => Thermal::Hot,
                SandboxState::Paused => Thermal::Warm,
                SandboxState::Stopped | SandboxState::Failed => Thermal::Cold,
            };
            let status = match sb.state {
                SandboxState::Creating => SandboxStatus::Creating,
                SandboxState::Failed => SandboxStatus::Failed,
                _ if row.status == "creating" => SandboxStatus::Creating,
                SandboxState::Stopped if row.status == "stopped" => SandboxStatus::Stopped,
                _ => SandboxStatus::Running,
            };
            let error = (status == SandboxStatus::Failed)
                .then(|| sb.error.clone())
                .flatten();
            (status, thermal, error)
        }
    };
    SandboxView {
        id: row.id.clone(),
        name: row.name.clone(),
        status,
        thermal,
        cpus: sb
            .map(|s| u32::from(s.cpus))
            .or_else(|| spec_u32("cpus"))
            .unwrap_or(0),
        memory_mb: sb
            .map(|s| s.memory_mb)
            .or_else(|| spec_u32("memory_mb"))
            .unwrap_or(0),
        disk_mb: sb.and_then(|s| s.disk_mb),
        keep_hot: row.keep_hot,
        labels: row.labels.clone(),
        ip: sb.and_then(|s| s.ip).map(|ip| ip.to_string()),
        network: None,
        created_at: rfc3339_ms(row.created_at),
        error,
        image: spec_str("image"),
        template: spec_str("template"),
        origin: spec_str("origin").or_else(|| {
            Some(
                if row.spec.get("from_snapshot").is_some() {
                    "fork"
                } else {
                    "boot"
                }
                .into(),
            )
        }),
        thermal_info: None,
        init: row
            .spec
            .get(SPEC_INIT_RESULT)
            .and_then(|v| serde_json::from_value(v.clone()).ok()),
        volumes: Vec::new(),
    }
}

/// The sandbox's volumes for its view (best effort: a store error leaves
/// them out).
async fn with_volumes(st: &AppState, mut v: SandboxView) -> SandboxView {
    let id = v.id.clone();
    match st
        .store
        .read(move |c| crate::store::volumes::of_sandbox(c, &id))
        .await
    {
        Ok(list) => {
            v.volumes = list
                .into_iter()
                .map(|a| crate::api_types::SandboxVolumeView {
                    name: a.volume_name,
                    mount: a.mount,
                    read_only: a.read_only,
                })
                .collect();
        }
        Err(e) => tracing::warn!(id = %v.id, "reading the sandbox's volumes: {e}"),
    }
    v
}

fn view_of(st: &AppState, row: &SandboxRow) -> SandboxView {
    let mut v = view_with_network(st, row, st.engine.get(&row.id).ok().as_ref());
    v.thermal_info = st.thermal.info(&row.id);
    v
}

/// [`view`] plus the network section (address, gateway, DNS name, egress).
fn view_with_network(st: &AppState, row: &SandboxRow, sb: Option<&Sandbox>) -> SandboxView {
    let mut v = view(row, sb);
    v.network = network_view(st, row);
    if v.ip.is_none() {
        v.ip = v.network.as_ref().map(|n| n.ip.clone());
    }
    v
}

fn network_view(st: &AppState, row: &SandboxRow) -> Option<NetworkView> {
    let tenants = st.tenants.as_ref()?;
    let ip_host = row.ip_host?;
    let owner = st.user_net(&row.owner)?;
    let policy = egress_of(st, row);
    let sb = TenantSandbox {
        id: row.id.clone(),
        name: row.name.clone(),
        user: owner,
        ip_host,
        egress: policy.clone(),
    };
    let attach = tenants.attach(&sb).ok()?;
    Some(NetworkView {
        ip: attach.ip.to_string(),
        gateway: attach.gateway.to_string(),
        dns_name: format!("{}.{}", row.name, tenants.settings().dns_suffix),
        egress: policy.egress.to_string(),
        allow: policy.allow.iter().map(ToString::to_string).collect(),
        deny: policy.deny.iter().map(ToString::to_string).collect(),
    })
}

/// The sandbox's policy, or the config's default.
fn egress_of(st: &AppState, row: &SandboxRow) -> EgressPolicy {
    row.egress.clone().unwrap_or_else(|| EgressPolicy {
        egress: st.config.network.default_egress,
        ..Default::default()
    })
}

/// The network's view of a user.
pub(super) fn tenant_user(u: &User) -> TenantUser {
    TenantUser {
        user_id: u.id.clone(),
        index: u.net_index,
        isolated: u.net_isolated,
    }
}

/// The network's view of one of `user`'s sandboxes, when it has an address.
pub(super) fn tenant_sandbox(
    st: &AppState,
    row: &SandboxRow,
    user: &User,
) -> Option<TenantSandbox> {
    Some(TenantSandbox {
        id: row.id.clone(),
        name: row.name.clone(),
        user: tenant_user(user),
        ip_host: row.ip_host?,
        egress: egress_of(st, row),
    })
}

/// Where a sandbox's row keeps how its `init` went ([`InitView`]).
const SPEC_INIT_RESULT: &str = "init_result";
/// A create's body: the usual JSON limit plus room for its files (base64).
const MAX_CREATE_JSON: usize = super::MAX_JSON + 2 * crate::api_types::MAX_FILES_BYTES;

/// Creates a sandbox (or forks a checkpoint). Idempotent by name: an
/// existing name answers 200 with that sandbox.
#[utoipa::path(post, path = "/sandboxes", tag = "sandboxes",
    request_body = Option<CreateSandbox>,
    responses(
        (status = 201, body = SandboxView, description = "Created; its agent answers"),
        (status = 200, body = SandboxView, description = "A sandbox of that name existed"),
        (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError, description = "from_snapshot names no checkpoint"),
        (status = 413, body = crate::api_types::ApiError),
        (status = 429, body = crate::api_types::ApiError),
        (status = 502, body = crate::api_types::ApiError)))]
pub async fn create(
    State(st): State<AppStateRef>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateSandbox, MAX_CREATE_JSON>,
) -> Result<Response, ApiError> {
    let state = st.clone();
    st.detached(create_to_end(state, caller, req)).await
}

/// [`create`]'s work, run to its end even when the client goes away.
pub(super) async fn create_to_end(
    st: AppStateRef,
    caller: Caller,
    req: CreateSandbox,
) -> Result<Response, ApiError> {
    let t0 = std::time::Instant::now();
    // Phase times for profiling (`RUST_LOG=bhatti::timing=debug`).
    let ph = |phase: &str| {
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(target: "bhatti::timing", op = "create", phase, ms);
    };
    caller.rate(&st, RequestClass::Create)?;
    req.validate(&st.config.vm.size_bounds())?;
    let files = crate::api_types::decode_files(&req.files)?;
    if let Some(snap) = req.from_snapshot.clone() {
        if req.cpus.is_some()
            || req.memory_mb.is_some()
            || req.disk_mb.is_some()
            || !req.env.is_empty()
            || req.init.is_some()
            || !req.secrets.is_empty()
        {
            return Err(ApiError::BadRequest(
                "from_snapshot: cpus, memory_mb, disk_mb, env, init and secrets come from the checkpoint".into(),
            ));
        }
        return fork_with_files(
            &st,
            &caller,
            &snap,
            req.name,
            req.keep_hot,
            req.labels,
            files,
        )
        .await;
    }
    if let Some(existing) = existing(&st, &caller, req.name.as_deref()).await? {
        return Ok((StatusCode::OK, Json(view_of(&st, &existing))).into_response());
    }
    // A template's settings under the request's own; the env a guest boots
    // with (image and template) is kept apart from the request's, which a
    // pre-booted guest gets later.
    let (req, boot_env) = match req.template.clone() {
        Some(t) => {
            let tpl = super::templates::load(&st, &caller.user.id, &t).await?;
            with_template(req, tpl.spec)
        }
        None => (req, BTreeMap::new()),
    };
    ph("template");
    let base =
        super::base_image::base_image_or_pull(&st, &caller.user.id, req.image.as_deref()).await?;
    ph("base");
    let sizes = super::templates::sizes(&st, req.cpus, req.memory_mb, req.disk_mb);
    let (cpus, memory_mb, disk_mb) = (sizes.cpus, sizes.memory_mb, sizes.disk_mb);
    caller.caps.check_sandbox_size(cpus, memory_mb)?;
    let shape = super::templates::shape(
        &caller.user.id,
        base.as_ref(),
        &sizes,
        boot_env,
        req.init.clone(),
    );
    let mut env = shape.env.clone();
    env.extend(req.env.clone());
    if !req.secrets.is_empty() {
        // Every named secret must exist now; the values are decrypted
        // again at each boot (the engine's SecretSource), never stored.
        let (owner, names, st2) = (caller.user.id.clone(), req.secrets.clone(), st.clone());
        tokio::task::spawn_blocking(move || {
            st2.store
                .with(|c| Ok(st2.secrets.resolve_env(c, &owner, &names)))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??
        .map_err(|e| match e {
            crate::secrets::SecretsError::Store(StoreError::NotFound(m)) => {
                ApiError::BadRequest(format!("secrets: {m}"))
            }
            other => other.into(),
        })?;
    }
    ph("secrets");
    let egress = req
        .network
        .as_ref()
        .map(|n| n.to_policy(st.config.network.default_egress))
        .transpose()?;
    let id = new_sandbox_id();
    let name = req.name.clone().unwrap_or_else(|| id.clone());
    // Templates and images are kept pre-booted: restore one when it is
    // ready, else boot (and have one built for next time).
    // A restored snapshot has a fixed device set: creates with volumes
    // always boot.
    let with_volumes = !(req.volumes.is_empty() && req.new_volumes.is_empty());
    let lease = match &st.prebooted {
        Some(p) if (req.template.is_some() || req.image.is_some()) && !with_volumes => {
            let lease = p.acquire(&shape);
            if lease.is_none() && (req.template.is_some() || shape.init.is_none()) {
                p.ensure(shape.clone());
            }
            lease
        }
        _ => None,
    };
    ph("lease");
    let mut stored = req.clone();
    stored.cpus = Some(cpus);
    stored.memory_mb = Some(memory_mb);
    stored.disk_mb = disk_mb;
    // The row keeps what files were given, not their bytes.
    stored.files = Vec::new();
    stored.wait_init = false;
    let mut stored = serde_json::to_value(&stored).unwrap_or_default();
    if let Some(obj) = stored.as_object_mut() {
        if !files.is_empty() {
            obj.insert("files".into(), files_summary(&files));
        }
        // The image's defaults (user made explicit): an exec without a
        // command runs the image's, and a saved image inherits them.
        if let Some(v) = base
            .as_ref()
            .and_then(|b| serde_json::to_value(&b.config).ok())
        {
            obj.insert(super::images::SPEC_IMAGE_CONFIG.into(), v);
        }
        let origin = if lease.is_some() { "instant" } else { "boot" };
        obj.insert("origin".into(), origin.into());
    }
    let plan = if with_volumes {
        Some(super::volumes::VolumePlan::prepare(&st, &caller.user.id, &id, &req).await?)
    } else {
        None
    };
    let inserted = insert_row(
        &st,
        &caller,
        &id,
        &name,
        stored,
        req.keep_hot,
        req.labels,
        egress,
        plan.clone(),
    )
    .await;
    let mut row = match inserted {
        Ok(Inserted::New(row)) => row,
        Ok(Inserted::Existing(row)) => {
            plan.inspect(|p| p.discard());
            return Ok((StatusCode::OK, Json(view_of(&st, &row))).into_response());
        }
        Err(e) => {
            plan.inspect(|p| p.discard());
            return Err(e);
        }
    };
    let volumes = if with_volumes {
        match super::volumes::mounts_of(&st, &id).await {
            Ok(v) => v,
            Err(e) => return Err(abandon_create(&st, &caller, &row, e).await),
        }
    } else {
        Vec::new()
    };
    ph("inserted");
    // A restore into a network that is up already: the sandbox's firewall
    // elements and DNS name are added while the snapshot restores (the
    // guest's packets are dropped until they are in place).
    let deferred = match (&lease, &st.tenants) {
        (Some(_), Some(t)) if t.has_user(&caller.user.id).await => {
            tenant_sandbox(&st, &row, &caller.user).map(|tsb| (t.clone(), tsb))
        }
        _ => None,
    };
    let network = match &deferred {
        Some((t, tsb)) => match t.attach(tsb) {
            Ok(n) => Some(n),
            Err(e) => {
                let e = ApiError::Internal(format!("the sandbox's network: {e}"));
                return Err(abandon_create(&st, &caller, &row, e).await);
            }
        },
        None => match attach_network(&st, &caller, &row).await {
            Ok(n) => n,
            Err(e) => return Err(abandon_create(&st, &caller, &row, e).await),
        },
    };
    ph("network");
    let spec = CreateSpec {
        name: Some(id.clone()),
        hostname: Some(name),
        cpus: u8::try_from(cpus).unwrap_or(u8::MAX),
        memory_mb,
        disk_mb,
        env,
        init: req.init.clone(),
        files,
        network,
        base: shape.base.clone(),
        user: shape.user.clone(),
        workdir: shape.workdir.clone(),
        volumes,
    };
    let result = match lease {
        Some(lease) => {
            let forked =
                match fork_beside_network(&st, &id, spec.clone(), &lease.dir, deferred).await {
                    Ok(r) => r,
                    Err(e) => return Err(abandon_create(&st, &caller, &row, e).await),
                };
            match forked {
                Ok(sb) => Ok(sb),
                Err(e) => {
                    tracing::warn!(id = %id, "the pre-booted snapshot did not restore ({e}); booting");
                    let r = st.engine.create_as(id.clone(), spec).await;
                    if r.is_ok() {
                        row = set_origin(&st, row, "boot").await;
                    }
                    r
                }
            }
        }
        None => st.engine.create_as(id.clone(), spec).await,
    };
    let init = req
        .init
        .as_deref()
        .is_some_and(|s| !s.trim().is_empty())
        .then_some(req.wait_init);
    ph("forked");
    let r = finish_create(&st, &caller, row, result, init).await;
    ph("finished");
    r
}

/// What a row shows of a create's files: path, mode and size of each.
fn files_summary(files: &[bhatti_protocol::guest_config::GuestFile]) -> serde_json::Value {
    files
        .iter()
        .map(|f| serde_json::json!({"path": f.path, "mode": f.mode, "bytes": f.content.len()}))
        .collect()
}

/// The fork, with the deferred network part (if any) beside it. `Err`:
/// the network part failed (a forked sandbox is destroyed again); `Ok`
/// carries the fork's own result.
async fn fork_beside_network(
    st: &AppState,
    id: &str,
    spec: CreateSpec,
    dir: &std::path::Path,
    deferred: Option<(std::sync::Arc<crate::net::tenants::Tenants>, TenantSandbox)>,
) -> Result<crate::engine::Result<Sandbox>, ApiError> {
    let fork = st.engine.fork(id.to_owned(), spec, dir);
    let Some((tenants, tsb)) = deferred else {
        return Ok(fork.await);
    };
    let (net, forked) = tokio::join!(tenants.add_sandbox(&tsb), fork);
    match net {
        Ok(()) => Ok(forked),
        Err(e) => {
            if forked.is_ok() {
                if let Err(de) = st.engine.destroy(id).await {
                    tracing::error!(id, "removing a fork whose network failed: {de}");
                }
            }
            Err(ApiError::Internal(format!(
                "setting up the sandbox's network: {e}"
            )))
        }
    }
}

/// `req` with the template's settings where it has none; the template's
/// env is returned apart (the guest boots with it).
fn with_template(
    mut req: CreateSandbox,
    t: crate::api_types::CreateTemplate,
) -> (CreateSandbox, BTreeMap<String, String>) {
    req.image = req.image.or(t.image);
    req.cpus = req.cpus.or(t.cpus);
    req.memory_mb = req.memory_mb.or(t.memory_mb);
    req.disk_mb = req.disk_mb.or(t.disk_mb);
    req.init = req.init.or(t.init);
    req.keep_hot |= t.keep_hot;
    for s in t.secrets {
        if !req.secrets.contains(&s) && !req.env.contains_key(&s) {
            req.secrets.push(s);
        }
    }
    (req, t.env)
}

/// How the new sandbox's `init` is doing, waited for when `wait` (up to
/// `vm.init_wait_timeout_secs`; a failing init fails no create).
async fn init_outcome(st: &AppState, id: &str, wait: bool) -> InitOutcome {
    let client = match st.engine.agent(id).await {
        Ok(c) => c,
        Err(e) => return InitOutcome::Unknown(format!("the agent: {e}")),
    };
    let agent_timeout = std::time::Duration::from_secs(st.config.vm.agent_timeout_secs);
    if wait {
        let timeout = std::time::Duration::from_secs(st.config.vm.init_wait_timeout_secs);
        crate::init_session::wait(&client, timeout, 0).await
    } else {
        crate::init_session::look(&client, agent_timeout).await
    }
}

/// Sets one key of the row's spec (best effort: logged on failure).
async fn set_spec_key(
    st: &AppState,
    mut row: SandboxRow,
    key: &str,
    value: serde_json::Value,
) -> SandboxRow {
    if let Some(o) = row.spec.as_object_mut() {
        o.insert(key.into(), value);
    }
    let (owner, id) = (row.owner.clone(), row.id.clone());
    let u = SandboxUpdate {
        spec: Some(row.spec.clone()),
        ..Default::default()
    };
    if let Err(e) = st
        .store
        .run(move |c| sandboxes::update(c, &owner, &id, &u))
        .await
    {
        tracing::warn!(id = %row.id, "recording {key}: {e}");
    }
    row
}

/// Records how the sandbox came to be (`origin` in its view).
async fn set_origin(st: &AppState, row: SandboxRow, origin: &str) -> SandboxRow {
    set_spec_key(st, row, "origin", origin.into()).await
}

/// The owner's network up and the sandbox's rules in place, before its
/// VM exists: the NIC's bridge and address for the engine.
async fn attach_network(
    st: &AppState,
    caller: &Caller,
    row: &SandboxRow,
) -> Result<Option<crate::net::NetAttach>, ApiError> {
    let Some(tenants) = st.tenants.as_ref() else {
        return Ok(None);
    };
    let Some(tsb) = tenant_sandbox(st, row, &caller.user) else {
        return Ok(None);
    };
    tenants
        .add_sandbox(&tsb)
        .await
        .map_err(|e| ApiError::Internal(format!("setting up the sandbox's network: {e}")))?;
    Ok(Some(tenants.attach(&tsb).map_err(|e| {
        ApiError::Internal(format!("the sandbox's network: {e}"))
    })?))
}

/// Removes the sandbox's network part (idempotent).
async fn detach_network(st: &AppState, caller_user: &User, row: &SandboxRow) {
    let (Some(tenants), Some(tsb)) = (st.tenants.as_ref(), tenant_sandbox(st, row, caller_user))
    else {
        return;
    };
    if let Err(e) = tenants.remove_sandbox(&tsb).await {
        tracing::error!(id = %row.id, "removing the sandbox's network: {e}");
    }
}

/// A create that failed before or in the engine: network and row go.
async fn abandon_create(st: &AppState, caller: &Caller, row: &SandboxRow, e: ApiError) -> ApiError {
    st.events
        .record(
            crate::store::events::NewEvent::new(&row.id, "create_failed")
                .owner(&row.owner)
                .latency_ms(since_row(row))
                .detail(e.public_message()),
        )
        .await;
    detach_network(st, &caller.user, row).await;
    let (owner, id) = (row.owner.clone(), row.id.clone());
    if let Err(de) = st
        .store
        .run(move |c| sandboxes::delete(c, &owner, &id))
        .await
    {
        tracing::error!(id = %row.id, "removing the row of a failed create: {de}");
    }
    super::volumes::drop_ephemeral(st, &row.owner, &row.id).await;
    e
}

/// `POST /snapshots/{name}/resume` and `from_snapshot`: a new sandbox from
/// a checkpoint, with a fresh identity.
pub(super) async fn fork(
    st: &AppStateRef,
    caller: &Caller,
    snapshot: &str,
    name: Option<String>,
    keep_hot: bool,
    labels: BTreeMap<String, String>,
) -> Result<Response, ApiError> {
    fork_with_files(st, caller, snapshot, name, keep_hot, labels, Vec::new()).await
}

/// [`fork`] placing `files` in the new sandbox after its restore.
async fn fork_with_files(
    st: &AppStateRef,
    caller: &Caller,
    snapshot: &str,
    name: Option<String>,
    keep_hot: bool,
    labels: BTreeMap<String, String>,
    files: Vec<bhatti_protocol::guest_config::GuestFile>,
) -> Result<Response, ApiError> {
    if let Some(existing) = existing(st, caller, name.as_deref()).await? {
        return Ok((StatusCode::OK, Json(view_of(st, &existing))).into_response());
    }
    let (owner, snap) = (caller.user.id.clone(), snapshot.to_owned());
    let cp = st
        .store
        .run(move |c| crate::store::snapshots::get(c, &owner, &snap))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no checkpoint '{snapshot}'")))?;
    let dir = super::snapshots::checkpoint_dir(st, &cp)?;
    let meta = CheckpointMeta::load(&dir)?;
    caller
        .caps
        .check_sandbox_size(u32::from(meta.vcpus), meta.memory_mib)?;
    let id = new_sandbox_id();
    let name = name.unwrap_or_else(|| id.clone());
    let stored = CreateSandbox {
        name: Some(name.clone()),
        cpus: Some(u32::from(meta.vcpus)),
        memory_mb: Some(meta.memory_mib),
        disk_mb: meta.spec.disk_mb,
        from_snapshot: Some(snapshot.to_owned()),
        ..Default::default()
    };
    let mut stored = serde_json::to_value(&stored).unwrap_or_default();
    if let (Some(obj), false) = (stored.as_object_mut(), files.is_empty()) {
        obj.insert("files".into(), files_summary(&files));
    }
    let plan = (!meta.spec.volumes.is_empty())
        .then(|| super::volumes::VolumePlan::for_fork(&meta.spec.volumes))
        .transpose()?;
    let row = match insert_row(st, caller, &id, &name, stored, keep_hot, labels, None, plan).await?
    {
        Inserted::New(row) => row,
        Inserted::Existing(row) => {
            return Ok((StatusCode::OK, Json(view_of(st, &row))).into_response())
        }
    };
    let network = match attach_network(st, caller, &row).await {
        Ok(n) => n,
        Err(e) => return Err(abandon_create(st, caller, &row, e).await),
    };
    let spec = CreateSpec {
        name: Some(id.clone()),
        hostname: Some(name),
        env: meta.spec.env.clone(),
        init: meta.spec.init.clone(),
        files,
        network,
        ..CreateSpec::default()
    };
    let result = st.engine.fork(id.clone(), spec, &dir).await;
    finish_create(st, caller, row, result, None).await
}

async fn existing(
    st: &AppState,
    caller: &Caller,
    name: Option<&str>,
) -> Result<Option<SandboxRow>, ApiError> {
    let Some(name) = name else { return Ok(None) };
    let (owner, name) = (caller.user.id.clone(), name.to_owned());
    Ok(st
        .store
        .run(move |c| Ok(sandboxes::get(c, &owner, &name)?.filter(|r| r.name == name)))
        .await?)
}

enum Inserted {
    New(SandboxRow),
    Existing(SandboxRow),
}

/// Records the sandbox as `creating` with an address from the owner's
/// network, checking the user's count cap first (all in one transaction
/// under one lock, so concurrent creates cannot overshoot the cap or share
/// an address).
#[allow(clippy::too_many_arguments)]
async fn insert_row(
    st: &AppState,
    caller: &Caller,
    id: &str,
    name: &str,
    spec: serde_json::Value,
    keep_hot: bool,
    labels: BTreeMap<String, String>,
    egress: Option<EgressPolicy>,
    volumes: Option<super::volumes::VolumePlan>,
) -> Result<Inserted, ApiError> {
    let _guard = st.create_lock.lock().await;
    let mut new = NewSandbox {
        id: id.to_owned(),
        owner: caller.user.id.clone(),
        name: name.to_owned(),
        spec,
        status: "creating".into(),
        keep_hot,
        labels,
        ip_host: None,
        egress,
    };
    if let Some(t) = &st.tenants {
        // The owner's network must fit the pool before anything is made.
        t.settings()
            .user_net(caller.user.net_index, false)
            .map_err(|e| ApiError::Conflict(format!("no network for this user: {e}")))?;
    }
    let networked = st.tenants.is_some();
    let caps = caller.caps;
    let max_volume_bytes = st.config.volumes.max_bytes_per_user;
    let r = st
        .store
        .transaction(move |tx| {
            if let Some(row) =
                sandboxes::get(tx, &new.owner, &new.name)?.filter(|r| r.name == new.name)
            {
                return Ok(Err(Some(row)));
            }
            let n = sandboxes::count(tx, &new.owner)?;
            if caps.check_sandbox_count(n).is_err() {
                return Ok(Err(None));
            }
            if networked {
                new.ip_host = Some(sandboxes::allocate_ip_host(tx, &new.owner)?);
            }
            let row = sandboxes::insert(tx, &new)?;
            // Volumes are attached with the row, in its transaction: two
            // racing creates cannot both get one read-write.
            if let Some(v) = &volumes {
                v.record(tx, &new.owner, &new.id, max_volume_bytes)?;
            }
            Ok(Ok(row))
        })
        .await?;
    match r {
        Ok(row) => Ok(Inserted::New(row)),
        Err(Some(row)) => Ok(Inserted::Existing(row)),
        Err(None) => Err(crate::auth::CapError::TooManySandboxes {
            max: caller.caps.max_sandboxes,
        }
        .into()),
    }
}

/// Milliseconds since a row was inserted: a create's latency for the event
/// log (validation and an image pull before it are not counted).
fn since_row(row: &SandboxRow) -> f64 {
    (crate::store::now_ms() - row.created_at).max(0) as f64
}

/// `init`: `None` when the sandbox has no init script, else whether to
/// wait for it to end (else it is only looked at) before answering.
async fn finish_create(
    st: &AppState,
    caller: &Caller,
    row: SandboxRow,
    result: crate::engine::Result<Sandbox>,
    init: Option<bool>,
) -> Result<Response, ApiError> {
    match result {
        Ok(sb) => {
            st.set_status(&row.owner, &row.id, "running").await;
            let mut row = row;
            row.status = "running".into();
            let mut sb = sb;
            if let Some(wait) = init {
                let outcome = init_outcome(st, &row.id, wait).await;
                if let InitOutcome::Exited { status, .. } = &outcome {
                    tracing::info!(id = %row.id, exit_code = status.exit_code, "init ended");
                }
                row = set_spec_key(
                    st,
                    row,
                    SPEC_INIT_RESULT,
                    serde_json::to_value(outcome.view()).unwrap_or_default(),
                )
                .await;
                // The engine's state after the wait (it may have changed).
                sb = st.engine.get(&row.id).unwrap_or(sb);
            }
            let view = with_volumes(st, view_with_network(st, &row, Some(&sb))).await;
            st.events
                .record(
                    crate::store::events::NewEvent::new(&row.id, "create")
                        .owner(&row.owner)
                        .latency_ms(since_row(&row)),
                )
                .await;
            Ok(created(view))
        }
        Err(e) => Err(abandon_create(st, caller, &row, e.into()).await),
    }
}

/// Query of `GET /sandboxes`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `k=v` (or `k`: the label is set), several comma-separated; all must
    /// match.
    label: Option<String>,
}

/// The caller's sandboxes, oldest first, optionally only those with some
/// labels. Never wakes any.
#[utoipa::path(get, path = "/sandboxes", tag = "sandboxes",
    params(("label" = Option<String>, Query, pattern = "^(?:[^,=][^,]*)?(?:,(?:[^,=][^,]*)?)*$",
        description = "Only sandboxes with these labels: k=v or k, comma-separated")),
    responses((status = 200, body = SandboxList), (status = 400, body = crate::api_types::ApiError),
        (status = 401, body = crate::api_types::ApiError)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
    super::Q(q): super::Q<ListQuery>,
) -> Result<Json<SandboxList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let mut want: Vec<(String, Option<String>)> = Vec::new();
    for part in q
        .label
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = match part.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (part, None),
        };
        if k.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "label: expected k=v or k, got {part:?}"
            )));
        }
        want.push((k.to_string(), v));
    }
    let owner = caller.user.id.clone();
    let rows = st.store.run(move |c| sandboxes::list(c, &owner)).await?;
    Ok(Json(SandboxList {
        sandboxes: rows
            .iter()
            .filter(|r| {
                want.iter().all(|(k, v)| match (r.labels.get(k), v) {
                    (Some(have), Some(v)) => have == v,
                    (Some(_), None) => true,
                    (None, _) => false,
                })
            })
            .map(|r| view_of(&st, r))
            .collect(),
    }))
}

/// One sandbox, by id or name. Never wakes it.
#[utoipa::path(get, path = "/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = SandboxView), (status = 404, body = crate::api_types::ApiError)))]
pub async fn get(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let row = st.sandbox(&caller, &id).await?;
    Ok(Json(with_volumes(&st, view_of(&st, &row)).await))
}

/// Changes `keep_hot` and/or replaces the labels.
#[utoipa::path(patch, path = "/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path)),
    request_body = PatchSandbox,
    responses((status = 200, body = SandboxView), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError)))]
pub async fn patch(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<PatchSandbox>,
) -> Result<Json<SandboxView>, ApiError> {
    let state = st.clone();
    st.detached(patch_to_end(state, caller, id, req)).await
}

/// [`patch`]'s work, run to its end even when the client goes away.
async fn patch_to_end(
    st: AppStateRef,
    caller: Caller,
    id: String,
    req: PatchSandbox,
) -> Result<Json<SandboxView>, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    req.validate()?;
    let before = st.sandbox(&caller, &id).await?;
    let egress = match &req.network {
        Some(n) => Some(n.to_policy(egress_of(&st, &before).egress)?),
        None => None,
    };
    // The rules change first: a policy that cannot be applied is not
    // recorded as if it were.
    if let (Some(policy), Some(tenants), Some(tsb)) = (
        &egress,
        st.tenants.as_ref(),
        tenant_sandbox(&st, &before, &caller.user),
    ) {
        tenants
            .set_egress(&tsb, policy)
            .await
            .map_err(|e| ApiError::Internal(format!("applying the egress policy: {e}")))?;
    }
    let update = SandboxUpdate {
        keep_hot: req.keep_hot,
        labels: req.labels,
        name: req.name.clone().filter(|n| *n != before.name),
        egress: egress.clone(),
        ..Default::default()
    };
    let (owner, rid) = (before.owner.clone(), before.id.clone());
    let updated = st
        .store
        .run(move |c| sandboxes::update(c, &owner, &rid, &update))
        .await;
    let row = match updated {
        Ok(row) => row,
        Err(e) => {
            // Put the old policy back.
            if let (Some(_), Some(tenants), Some(tsb)) = (
                &egress,
                st.tenants.as_ref(),
                tenant_sandbox(&st, &before, &caller.user),
            ) {
                let _ = tenants.set_egress(&tsb, &tsb.egress).await;
            }
            return Err(e.into());
        }
    };
    if row.name != before.name {
        if let Some(t) = &st.tenants {
            t.rename(&row.owner, &before.name, &row.name);
        }
        tracing::info!(id = %row.id, from = %before.name, to = %row.name, "sandbox renamed");
        super::ports::follow_rename(&st, &row, &before.name).await;
    }
    if let Some(k) = req.keep_hot {
        st.thermal.set_keep_hot(&row.id, k);
    }
    Ok(Json(view_of(&st, &row)))
}

/// Destroys a sandbox: VM, disks, snapshots (not checkpoints), network.
#[utoipa::path(delete, path = "/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = crate::api_types::ApiError)))]
pub async fn delete(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let state = st.clone();
    st.detached(delete_to_end(state, caller, id)).await
}

/// [`delete`]'s work, run to its end even when the client goes away.
async fn delete_to_end(
    st: AppStateRef,
    caller: Caller,
    id: String,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let row = st.sandbox(&caller, &id).await?;
    destroy_row(&st, &caller.user, &row).await
}

/// Destroys `row`'s sandbox (owned by `owner`): VM, disks, network, row.
pub(super) async fn destroy_row(
    st: &AppState,
    owner: &User,
    row: &SandboxRow,
) -> Result<StatusCode, ApiError> {
    let t0 = std::time::Instant::now();
    let r = async {
        st.engine.destroy(&row.id).await?;
        st.thermal.forget(&row.id);
        detach_network(st, owner, row).await;
        let (owner, rid) = (row.owner.clone(), row.id.clone());
        st.store
            .run(move |c| sandboxes::delete(c, &owner, &rid))
            .await?;
        super::volumes::drop_ephemeral(st, &row.owner, &row.id).await;
        tracing::info!(id = %row.id, name = %row.name, "sandbox deleted");
        Ok(StatusCode::NO_CONTENT)
    }
    .await;
    st.events
        .outcome(&row.owner, &row.id, "destroy", t0, r.as_ref().err())
        .await;
    r
}

/// Snapshots the sandbox to disk and ends its VMM (memory freed).
#[utoipa::path(post, path = "/sandboxes/{id}/stop", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 200, body = SandboxView), (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError)))]
pub async fn stop(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SandboxView>, ApiError> {
    let state = st.clone();
    st.detached(stop_to_end(state, caller, id)).await
}

/// [`stop`]'s work, run to its end even when the client goes away.
async fn stop_to_end(
    st: AppStateRef,
    caller: Caller,
    id: String,
) -> Result<Json<SandboxView>, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let mut row = st.sandbox(&caller, &id).await?;
    let sb = stop_row(&st, &mut row).await?;
    Ok(Json(view_with_network(&st, &row, Some(&sb))))
}

/// Snapshots `row`'s sandbox to disk and records it `stopped`.
pub(super) async fn stop_row(st: &AppState, row: &mut SandboxRow) -> Result<Sandbox, ApiError> {
    if row.status == "creating" {
        return Err(ApiError::Conflict(
            "the sandbox is still being created".into(),
        ));
    }
    let t0 = std::time::Instant::now();
    let sb = st
        .engine
        .snapshot_to_disk(&row.id)
        .await
        .map_err(ApiError::from);
    st.events
        .outcome(&row.owner, &row.id, "stop", t0, sb.as_ref().err())
        .await;
    let sb = sb?;
    st.set_status(&row.owner, &row.id, "stopped").await;
    row.status = "stopped".into();
    Ok(sb)
}

/// Starts a stopped sandbox: from its memory snapshot, or (`fresh`) from
/// its disk.
#[utoipa::path(post, path = "/sandboxes/{id}/start", tag = "sandboxes",
    params(("id" = String, Path)),
    request_body(content = Option<StartRequest>, description = "Optional"),
    responses((status = 200, body = SandboxView), (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError), (status = 502, body = crate::api_types::ApiError)))]
pub async fn start(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<StartRequest>,
) -> Result<Json<SandboxView>, ApiError> {
    let state = st.clone();
    st.detached(start_to_end(state, caller, id, req)).await
}

/// [`start`]'s work, run to its end even when the client goes away.
async fn start_to_end(
    st: AppStateRef,
    caller: Caller,
    id: String,
    req: StartRequest,
) -> Result<Json<SandboxView>, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let mut row = st.sandbox(&caller, &id).await?;
    let sb = start_row(&st, &mut row, req.fresh).await?;
    Ok(Json(view_with_network(&st, &row, Some(&sb))))
}

/// Starts `row`'s stopped sandbox (`fresh`: from its disk) and records it
/// `running`.
pub(super) async fn start_row(
    st: &AppState,
    row: &mut SandboxRow,
    fresh: bool,
) -> Result<Sandbox, ApiError> {
    if row.status == "creating" {
        return Err(ApiError::Conflict(
            "the sandbox is still being created".into(),
        ));
    }
    let t0 = std::time::Instant::now();
    let sb = if fresh {
        st.engine.start_fresh(&row.id).await
    } else {
        st.engine.start(&row.id).await
    }
    .map_err(ApiError::from);
    st.events
        .outcome(&row.owner, &row.id, "start", t0, sb.as_ref().err())
        .await;
    let sb = sb?;
    st.set_status(&row.owner, &row.id, "running").await;
    row.status = "running".into();
    Ok(sb)
}
