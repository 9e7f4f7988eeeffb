//! The OpenAPI document and the router cannot drift: every path and method
//! in `/openapi.json` is served by the router (not its fallback, not 405),
//! every other method on those paths is 405, and every route documented in
//! docs/api.md is in the document. Runs the real router in-process with an
//! engine that never boots a VM (no root, no artifacts needed; QEMU only
//! has to be installed).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use bhatti::api::{self, AppState};
use bhatti::config::{Config, DiskStrategy};
use bhatti::engine::{Engine, EngineConfig};
use bhatti::store::users::UserCaps;
use http_body_util::BodyExt;
use tower::ServiceExt;

const METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];

/// The real router over an engine that never boots a VM, with one user.
struct Setup {
    app: axum::Router,
    key: String,
    store: bhatti::store::Store,
    _thermal: bhatti::thermal::ThermalManager,
    _dir: tempfile::TempDir,
}

async fn setup(test: &str) -> Option<Setup> {
    let Some(qemu) = bhatti_vmm::probe::probe().qemu else {
        bhatti_testkit::skip(test, "missing qemu");
        return None;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["vmlinux", "rootfs.ext4"] {
        std::fs::write(dir.path().join(f), b"x").expect("write");
    }
    let mut config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    config.network.enabled = false;
    config.vm.disk_strategy = DiskStrategy::Copy;
    let backend = bhatti_vmm::qemu::QemuBackend::new(bhatti_vmm::qemu::QemuConfig {
        binary: Some(qemu),
        accel: bhatti_vmm::qemu::Accel::Tcg,
        extra_args: vec![],
    })
    .expect("qemu backend");
    let mut ecfg = EngineConfig::new(
        &config.data_dir,
        dir.path().join("vmlinux"),
        dir.path().join("rootfs.ext4"),
        Arc::new(backend),
    );
    ecfg.net = None;
    ecfg.disk_strategy = bhatti::storage::DiskStrategy::Copy;
    let engine = Engine::new(ecfg).await.expect("engine");
    let store = bhatti::store::Store::open(config.db_path()).expect("store");
    let key = store
        .with(|c| {
            Ok(bhatti::auth::create_user(c, "u", UserCaps::default())
                .expect("user")
                .api_key)
        })
        .expect("user");
    let secrets = bhatti::secrets::SecretBox::load_or_create(&config.data_dir).expect("secrets");
    let thermal = bhatti::thermal::ThermalManager::spawn(
        engine.clone(),
        Some(std::sync::Arc::new(store.clone())),
        &config.thermal,
    );
    let state = Arc::new(AppState::new(
        engine,
        store.clone(),
        secrets,
        config,
        bhatti_vmm::BackendKind::Qemu,
        thermal.handle(),
        None,
    ));
    let app = api::router(state);

    Some(Setup {
        app,
        key,
        store,
        _thermal: thermal,
        _dir: dir,
    })
}

async fn send(app: &axum::Router, key: &str, method: &str, path: &str) -> (StatusCode, String) {
    let req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn openapi_matches_the_router() {
    let Some(Setup { app, key, .. }) = setup("openapi_matches_the_router").await else {
        return;
    };
    let send = |method: &str, path: &str| {
        let (app, key) = (app.clone(), key.clone());
        let (method, path) = (method.to_owned(), path.to_owned());
        async move { send(&app, &key, &method, &path).await }
    };

    let (status, body) = send("GET", "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let spec: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(spec["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.")));
    let paths = spec["paths"].as_object().expect("paths");
    let mut documented = Vec::new();
    for (path, item) in paths {
        let concrete = path
            .replace("{id}", "nope")
            .replace("{name}", "NOPE")
            .replace("{port}", "8000")
            .replace("{path}", "x");
        let methods: Vec<String> = item
            .as_object()
            .expect("path item")
            .keys()
            .map(|m| m.to_uppercase())
            .filter(|m| METHODS.contains(&m.as_str()))
            .collect();
        assert!(!methods.is_empty(), "{path} has no operations");
        for m in &methods {
            documented.push(format!("{m} {path}"));
            let (status, body) = send(m, &concrete).await;
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}: {body}");
            assert!(
                !body.contains("no such route"),
                "{m} {path} hit the fallback: {body}"
            );
            // Every documented operation has a response schema or description.
            let op = &item[m.to_lowercase()];
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{m} {path}"
            );
        }
        for m in METHODS {
            let implied_head = m == "HEAD" && methods.iter().any(|x| x == "GET");
            if methods.iter().any(|x| x == m) || implied_head {
                continue;
            }
            let (status, body) = send(m, &concrete).await;
            assert_eq!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{m} {path} is routed but not documented: {body}"
            );
        }
    }
    // Unknown paths are the fallback's.
    let (status, body) = send("GET", "/sandboxes/x/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no such route"), "{body}");

    // The contract in docs/api.md: every route it lists is in the document.
    let contract = [
        "GET /health",
        "GET /openapi.json",
        "GET /metrics",
        "POST /sandboxes",
        "GET /sandboxes",
        "GET /sandboxes/{id}",
        "PATCH /sandboxes/{id}",
        "DELETE /sandboxes/{id}",
        "POST /sandboxes/{id}/stop",
        "POST /sandboxes/{id}/start",
        "POST /sandboxes/{id}/exec",
        "GET /sandboxes/{id}/ws",
        "GET /sandboxes/{id}/sessions",
        "POST /sandboxes/{id}/shell-token",
        "DELETE /sandboxes/{id}/shell-token",
        "GET /_shell/{id}",
        "GET /_shell/assets/{file}",
        "GET /_shell/{id}/token",
        "GET /_shell/{id}/ws",
        "GET /sandboxes/{id}/exec/ws",
        "DELETE /sandboxes/{id}/sessions/{sid}",
        "GET /sandboxes/{id}/files",
        "PUT /sandboxes/{id}/files",
        "HEAD /sandboxes/{id}/files",
        "POST /sandboxes/{id}/checkpoint",
        "GET /snapshots",
        "POST /snapshots/{name}/resume",
        "DELETE /snapshots/{name}",
        "PUT /secrets/{name}",
        "GET /secrets",
        "DELETE /secrets/{name}",
        "POST /templates",
        "GET /templates",
        "GET /templates/{name}",
        "DELETE /templates/{name}",
        "GET /events",
        "GET /sandboxes/{id}/ports",
        "GET /ports",
        "POST /sandboxes/{id}/publish",
        "GET /sandboxes/{id}/publish",
        "DELETE /sandboxes/{id}/publish/{port}",
        "GET /sandboxes/{id}/proxy/{port}/{path}",
        "POST /sandboxes/{id}/proxy/{port}/{path}",
        "PUT /sandboxes/{id}/proxy/{port}/{path}",
        "PATCH /sandboxes/{id}/proxy/{port}/{path}",
        "DELETE /sandboxes/{id}/proxy/{port}/{path}",
        "HEAD /sandboxes/{id}/proxy/{port}/{path}",
        "GET /images",
        "POST /images/pull",
        "POST /images/import",
        "GET /images/{name}",
        "DELETE /images/{name}",
        "POST /sandboxes/{id}/save-image",
        "GET /tasks",
        "GET /tasks/{id}",
        "DELETE /tasks/{id}",
        "POST /volumes",
        "GET /volumes",
        "GET /volumes/{name}",
        "DELETE /volumes/{name}",
        "POST /volumes/{name}/resize",
        "POST /volumes/{name}/clone",
        "POST /volumes/{name}/backups",
        "GET /volumes/{name}/backups",
        "GET /volumes/{name}/backups/{id}",
        "DELETE /volumes/{name}/backups/{id}",
        "POST /volumes/{name}/restore",
        "PUT /volumes/{name}/backup-schedule",
        "GET /volumes/{name}/backup-schedule",
        "DELETE /volumes/{name}/backup-schedule",
    ];
    documented.sort();
    let mut want: Vec<String> = contract.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(
        documented, want,
        "the OpenAPI document and docs/api.md list different routes"
    );
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md"))
        .expect("docs/api.md");
    for route in contract {
        assert!(
            doc.contains(&format!("| `{route}` |")),
            "the route table of docs/api.md does not list {route}"
        );
    }
}

#[tokio::test]
async fn a_rotated_key_stops_working_at_once() {
    let Some(st) = setup("a_rotated_key_stops_working_at_once").await else {
        return;
    };
    assert_eq!(
        send(&st.app, &st.key, "GET", "/sandboxes").await.0,
        StatusCode::OK
    );
    let new_key = st
        .store
        .with(|c| Ok(bhatti::auth::rotate_key(c, "u").expect("rotate").api_key))
        .expect("rotate");
    assert_eq!(
        send(&st.app, &st.key, "GET", "/sandboxes").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&st.app, &new_key, "GET", "/sandboxes").await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn websocket_routes_answer_plain_http_426_and_bodies_must_be_objects() {
    let test = "websocket_routes_answer_plain_http_426_and_bodies_must_be_objects";
    let Some(Setup { app, key, .. }) = setup(test).await else {
        return;
    };
    for path in ["/sandboxes/nope/ws", "/sandboxes/nope/exec/ws"] {
        let req = Request::builder()
            .uri(path)
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::UPGRADE_REQUIRED, "{path}");
        assert_eq!(
            resp.headers().get("upgrade").and_then(|v| v.to_str().ok()),
            Some("websocket"),
            "{path}"
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("WebSocket")),
            "{v}"
        );
    }
    // A struct's fields as an array, or a scalar: refused, nothing made.
    for body in ["[null, null]", "3", "\"x\""] {
        let req = Request::builder()
            .method(Method::POST)
            .uri("/volumes")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    let (status, body) = send(&app, &key, "GET", "/volumes").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"volumes\":[]"), "{body}");
}
