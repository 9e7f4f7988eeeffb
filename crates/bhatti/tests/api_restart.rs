//! The daemon as users run it (`bhatti serve --config`, a child process):
//! killed with SIGKILL while sandboxes run, then restarted, it re-adopts
//! the running VMs (their files and processes intact) and recovers the
//! stopped one; a SIGTERM stops it gracefully, leaving the VMs running.

mod api_support;

use std::time::Duration;

use api_support::*;
use bhatti::store::users::UserCaps;
use serde_json::json;

fn vmm_alive(env: &Env, id: &str) -> bool {
    let run = env.data_dir().join("run").join(id);
    std::fs::read_to_string(run.join("vmm.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_readopts_sandboxes() {
    let Some(art) = artifacts("daemon_restart_readopts_sandboxes") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let env = Env::new(art);
    let key = env.user("alice", UserCaps::default());
    env.write_config(&env.config());
    let mut p = Proc::spawn(&env, 1);
    ready(&env, &mut p, 1).await;
    let a = env.client(Some(&key));

    let keep = a
        .post("/sandboxes", json!({"name": "keep"}))
        .await
        .expect(201);
    let keep_id = keep["id"].as_str().expect("id").to_owned();
    let cold = a
        .post("/sandboxes", json!({"name": "cold"}))
        .await
        .expect(201);
    let cold_id = cold["id"].as_str().expect("id").to_owned();
    a.put("/sandboxes/keep/files?path=/home/lohar/state.txt", "kept\n")
        .await
        .expect(200);
    let bg = a
        .post(
            "/sandboxes/keep/exec",
            json!({"cmd": ["sh", "-c", "echo $$ > /home/lohar/bg.pid; exec sleep 1000"], "detach": true}),
        )
        .await
        .expect(200);
    let bg_pid = bg["pid"].as_u64().expect("pid");
    eventually("the pid file", Duration::from_secs(30), || async {
        let (_, out, _) = a.sh("keep", "cat /home/lohar/bg.pid 2>/dev/null").await;
        (out.trim() == bg_pid.to_string()).then_some(())
    })
    .await;
    a.sh("cold", "echo cold-file > /home/lohar/c.txt").await;
    a.post("/sandboxes/cold/stop", json!({})).await.expect(200);

    // SIGKILL: no chance to clean anything up.
    p.signal(nix::sys::signal::Signal::SIGKILL);
    p.wait_exit(Duration::from_secs(10)).await;
    assert!(vmm_alive(&env, &keep_id), "the VMM outlives the daemon");
    assert!(!vmm_alive(&env, &cold_id));

    let mut p = Proc::spawn(&env, 2);
    ready(&env, &mut p, 2).await;
    let list = a.get("/sandboxes").await.expect(200);
    let by_name = |n: &str| {
        list["sandboxes"]
            .as_array()
            .and_then(|v| v.iter().find(|s| s["name"] == n).cloned())
            .unwrap_or_else(|| panic!("{n} missing: {list}"))
    };
    assert_eq!(
        (
            by_name("keep")["status"].as_str(),
            by_name("keep")["thermal"].as_str()
        ),
        (Some("running"), Some("hot"))
    );
    assert_eq!(
        (
            by_name("cold")["status"].as_str(),
            by_name("cold")["thermal"].as_str()
        ),
        (Some("stopped"), Some("cold"))
    );
    let (code, out, _) = a
        .sh(
            "keep",
            "cat /home/lohar/state.txt; kill -0 $(cat /home/lohar/bg.pid) && echo bg-alive",
        )
        .await;
    assert_eq!((code, out.as_str()), (0, "kept\nbg-alive\n"));
    assert_eq!(a.sh("cold", "cat /home/lohar/c.txt").await.1, "cold-file\n");

    // SIGTERM: graceful, VMs stay.
    p.signal(nix::sys::signal::Signal::SIGTERM);
    let status = p.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "graceful exit: {status}");
    assert!(vmm_alive(&env, &keep_id) && vmm_alive(&env, &cold_id));
    assert!(!env.sock().exists(), "the socket is removed");

    let mut p = Proc::spawn(&env, 3);
    ready(&env, &mut p, 3).await;
    let (_, out, _) = a
        .sh("keep", "kill -0 $(cat /home/lohar/bg.pid) && echo bg-alive")
        .await;
    assert_eq!(out, "bg-alive\n");
    a.delete("/sandboxes/keep").await.expect(204);
    a.delete("/sandboxes/cold").await.expect(204);
    assert!(!vmm_alive(&env, &keep_id));
    p.signal(nix::sys::signal::Signal::SIGTERM);
    p.wait_exit(Duration::from_secs(30)).await;
}
