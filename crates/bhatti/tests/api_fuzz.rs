//! schemathesis (PyPI) against the real daemon's `/openapi.json`, with two
//! users' keys: 0 responses 5xx, 0 schema violations (status codes, content
//! types, headers, bodies), every 4xx a JSON `{"error"}` body (the check in
//! `api_fuzz/hooks.py`), auth not ignored, other users' objects not
//! reachable, in the examples, coverage, fuzzing and stateful phases (links
//! inferred by schemathesis; the document declares none). Each user has at most 2 sandboxes (creating one boots a VM)
//! and one exists throughout: its id is the `{id}` of every run, so the
//! routes under `/sandboxes/{id}` see a real sandbox (the second user's
//! run sees one that is not theirs).
//!
//! `BHATTI_API_FUZZ_EXAMPLES=N` sets examples per operation (default 10;
//! the README's figures come from a long run). Needs `python3` with
//! `schemathesis` (scripts/install-deps.sh installs it), else one SKIP line.

mod api_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Instant;

use api_support::*;
use bhatti::store::users::UserCaps;
use serde_json::json;

/// Runs schemathesis' CLI with the `python3` install-deps used (its `st`
/// script may not be on PATH, e.g. under Debian's python3).
fn st() -> tokio::process::Command {
    let mut c = tokio::process::Command::new("python3");
    c.args([
        "-c",
        "import sys; from schemathesis.cli import schemathesis as main; sys.argv[0] = 'st'; sys.exit(main())",
    ]);
    c
}

fn have_schemathesis() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import schemathesis.cli"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn examples() -> u32 {
    std::env::var("BHATTI_API_FUZZ_EXAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// One `st run` as `key`, with `{id}` fixed to `sandbox`. Returns whether
/// it passed, and its summary.
async fn run(base: &str, key: &str, sandbox: &str, report_dir: &Path) -> (bool, String) {
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api_fuzz");
    let config = report_dir.join("schemathesis.toml");
    // `id` names the sandbox (and, harmlessly, tasks and backups); the
    // operations' settings are api_fuzz/schemathesis.toml's.
    let operations =
        std::fs::read_to_string(hooks.join("schemathesis.toml")).expect("schemathesis.toml");
    let toml = format!("[parameters]\nid = \"{sandbox}\"\n\n{operations}");
    std::fs::write(&config, toml).expect("config");
    let started = Instant::now();
    let out = st()
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args(["--checks", "all"])
        .args(["--max-examples", &examples().to_string()])
        .args(["--seed", "14", "--workers", "2", "--request-timeout", "120"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        // Not fuzzed: routes that reach out of the host (registries, S3),
        // copy whole disks, or proxy to a guest port (whose 502 for a
        // closed port is the right answer).
        .args([
            "--exclude-path-regex",
            "^/(images/import|sandboxes/\\{id\\}/(save-image|proxy/)|volumes/\\{name\\}/(backups|restore|backup-schedule))",
        ])
        .args(["--report", "junit", "--report-dir"])
        .arg(report_dir)
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", &hooks)
        .env("NO_COLOR", "1")
        // Its cache and Python's bytecode go to the temp dir, not the tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(report_dir)
        .output()
        .await
        .expect("run schemathesis");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "schemathesis as one user: {:.0} s",
        started.elapsed().as_secs_f64()
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failures() {
    let test = "schemathesis_finds_no_failures";
    let Some(art) = artifacts(test) else {
        return;
    };
    if !have_schemathesis() {
        bhatti_testkit::skip(
            test,
            "python3 without schemathesis (scripts/install-deps.sh)",
        );
        return;
    }
    init_tracing();
    let _serial = SERIAL.lock().await;
    let env = Env::new(art);
    let port = free_port();
    let mut config = env.config();
    config.listen_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    // Fuzzing is many requests a second: rate limits are another test's.
    config.limits.rate.read_per_second = 100_000;
    config.limits.rate.read_burst = 100_000;
    // A well-formed `image` would be pulled from a public registry: a
    // test reaches nothing outside the host.
    config.images.allow_pull = false;
    let caps = UserCaps {
        max_sandboxes: Some(2),
        max_cpus: Some(4),
        max_memory_mb: Some(2048),
        max_snapshots: Some(2),
    };
    let alice = env.user("alice", caps);
    let bob = env.user("bob", caps);
    let daemon = Daemon::start(&env, config).await;

    let a = env.client(Some(&alice));
    let sb = a
        .post("/sandboxes", json!({"name": "fuzz-a"}))
        .await
        .expect(201);
    let id = sb["id"].as_str().expect("sandbox id").to_owned();

    let base = format!("http://127.0.0.1:{port}");
    let mut failed = Vec::new();
    for (who, key) in [("alice", &alice), ("bob", &bob)] {
        let dir = env.dir.path().join(format!("st-{who}"));
        std::fs::create_dir_all(&dir).expect("report dir");
        let (ok, text) = run(&base, key, &id, &dir).await;
        eprintln!("---- schemathesis as {who} ----\n{text}");
        if !ok {
            failed.push(who);
        }
    }
    // Whatever was fuzzed, the fixture sandbox still answers its owner.
    a.get(&format!("/sandboxes/{id}")).await.expect(200);
    daemon.stop().await;
    assert!(
        failed.is_empty(),
        "schemathesis failures as {failed:?} (output above)"
    );
}
