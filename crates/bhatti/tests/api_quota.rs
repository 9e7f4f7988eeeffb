//! The checkpoint storage quota (`[limits] max_snapshot_bytes`): a
//! checkpoint reserves its VM's memory plus disk size before it is taken,
//! in the same transaction as the check, so two at once cannot both pass
//! when only one fits; the space returns when a checkpoint is deleted.

mod api_support;

use api_support::*;
use bhatti::store::users::UserCaps;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_bytes_are_reserved_before_the_work() {
    let Some(art) = artifacts("checkpoint_bytes_are_reserved_before_the_work") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    // The most one checkpoint of a 512 MiB sandbox may take: its memory and
    // its disk (a clone of the rootfs, apparent size). Room for one and a
    // half: never two, whatever their real sizes turn out to be, since the
    // disk copy alone is most of it.
    let disk = std::fs::metadata(&env.art.rootfs).expect("rootfs").len();
    let most = (512u64 << 20) + disk;
    let mut cfg = env.config();
    cfg.limits.max_snapshots = 10;
    cfg.limits.max_snapshot_bytes = most + most / 2;
    let key = env.user(
        "alice",
        UserCaps {
            max_snapshots: Some(10),
            ..Default::default()
        },
    );
    let daemon = Daemon::start(&env, cfg).await;
    let a = env.client(Some(&key));
    a.post("/sandboxes", json!({"name": "one", "memory_mb": 512}))
        .await
        .expect(201);

    let (r1, r2) = tokio::join!(
        a.post("/sandboxes/one/checkpoint", json!({"name": "c1"})),
        a.post("/sandboxes/one/checkpoint", json!({"name": "c2"})),
    );
    let mut codes = [r1.status.as_u16(), r2.status.as_u16()];
    codes.sort_unstable();
    assert_eq!(codes, [201, 429]);
    let refused = if r1.status == 429 { &r1 } else { &r2 };
    let msg = refused.expect_err(429);
    assert!(msg.contains("storage limit"), "{msg}");
    let v = a.get("/snapshots").await.expect(200);
    let list = v["snapshots"].as_array().expect("snapshots");
    assert_eq!(list.len(), 1, "{v}");
    let taken = list[0]["name"].as_str().expect("name").to_owned();

    // A third, after the first has its real size: still no room.
    a.post("/sandboxes/one/checkpoint", json!({"name": "c3"}))
        .await
        .expect_err(429);
    // Deleting it gives the space back.
    a.delete(&format!("/snapshots/{taken}")).await.expect(204);
    a.post("/sandboxes/one/checkpoint", json!({"name": "c4"}))
        .await
        .expect(201);
    daemon.stop().await;
}
