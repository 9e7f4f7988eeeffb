//! The image catalogue end to end, with real VMs and a real registry
//! (Debian's `docker-registry` on 127.0.0.1, images built by `umoci` with a
//! static busybox as their userland, pushed by `skopeo`): pull → create →
//! exec sees the image's files, env, workdir and user; auth; bad refs;
//! cancel; re-pull; import; save-image; quota; delete.
//!
//! Needs the VM artifacts (`scripts/artifacts.sh`, BHATTI_LOHAR included)
//! and `docker-registry umoci skopeo apache2-utils busybox-static`.

mod api_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use api_support::*;
use bhatti::store::users::UserCaps;
use bhatti_testkit::registry::{missing_tool, run, Layout, Registry};
use serde_json::{json, Value};

const BUSYBOX: &str = "/bin/busybox";

/// Artifacts, lohar and the tools, or `None` after one SKIP line.
fn setup(test: &str) -> Option<(Artifacts, PathBuf)> {
    if let Some(t) = missing_tool() {
        bhatti_testkit::skip(test, &format!("{t} is not installed"));
        return None;
    }
    if !Path::new(BUSYBOX).is_file() {
        bhatti_testkit::skip(test, "no static busybox (busybox-static)");
        return None;
    }
    let art = artifacts(test)?;
    let Some(lohar) = bhatti_testkit::lohar() else {
        bhatti_testkit::skip(test, "no lohar binary (BHATTI_LOHAR)");
        return None;
    };
    Some((art, lohar))
}

/// A busybox userland: `/bin/busybox` and its applets as links.
fn busybox_root(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).expect("bin");
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
    for applet in [
        "sh", "cat", "echo", "id", "pwd", "ls", "env", "test", "sync", "sleep", "true",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet");
    }
    std::fs::create_dir_all(root.join("etc")).expect("etc");
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/srv/app:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").expect("group");
}

/// The test image: layer 1 a userland and /srv/app/{hello,gone}.txt,
/// layer 2 deletes gone.txt (a whiteout); env, workdir, user, cmd.
fn app_image(dir: &Path) -> Layout {
    let mut l = Layout::new(dir, "v1");
    l.layer(|root| {
        busybox_root(root);
        std::fs::create_dir_all(root.join("srv/app")).expect("app dir");
        std::fs::write(root.join("srv/app/hello.txt"), "hello from layer 1\n").expect("hello");
        std::fs::write(root.join("srv/app/gone.txt"), "deleted above\n").expect("gone");
        std::os::unix::fs::chown(root.join("srv/app"), Some(1000), Some(1000)).expect("chown");
    });
    l.layer(|root| std::fs::remove_file(root.join("srv/app/gone.txt")).expect("rm gone"));
    l.config(&[
        "--config.env",
        "GREETING=hi",
        "--config.env",
        "PATH=/bin",
        "--config.workingdir",
        "/srv/app",
        "--config.user",
        "1000",
        "--config.cmd",
        "/bin/sh",
        "--config.cmd",
        "-c",
        "--config.cmd",
        "echo default-cmd $GREETING",
    ]);
    l
}

/// Follows a task until it ends.
async fn wait_task(c: &Client, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let t = c.get(&format!("/tasks/{id}")).await.expect(200);
        if t["state"] != "running" {
            return t;
        }
        assert!(Instant::now() < deadline, "task {id} did not end: {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn pull(c: &Client, body: Value) -> Value {
    let v = c.post("/images/pull", body).await.expect(202);
    let id = v["task"]["id"].as_str().expect("task id").to_owned();
    wait_task(c, &id).await
}

/// Every file under `dir`, recursively (for "nothing left behind").
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
            out.push(p);
        } else {
            out.push(p);
        }
    }
    out
}

fn user_id(env: &Env, name: &str) -> String {
    let store = bhatti::store::Store::open(env.data_dir().join("bhatti.db")).expect("store");
    store
        .with(|c| bhatti::store::users::get_by_name(c, name))
        .expect("user")
        .expect("user exists")
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_create_exec_auth_and_delete() {
    let Some((art, lohar)) = setup("images::pull_create_exec_auth_and_delete") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let work = tempfile::tempdir().expect("tempdir");
    let open = Registry::start(None);
    let locked = Registry::start(Some(("bhatti", "s3cret")));
    let layout = app_image(work.path());
    let reference = open.push(&layout.image, "t/app:v1", None);
    let v2 = open.push(&layout.image, "t/app:v2", None);
    let private = locked.push(&layout.image, "t/app:v1", Some("bhatti:s3cret"));

    let env = Env::new(art);
    let mut cfg = env.config();
    cfg.images.lohar = lohar;
    let key = env.user("alice", UserCaps::default());
    let daemon = Daemon::start(&env, cfg).await;
    let a = env.client(Some(&key));

    // Pull: a task that ends with the image, named from the ref.
    let t = pull(&a, json!({"ref": reference})).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["kind"], "pull");
    let image = &t["image"];
    assert_eq!(image["name"], "app:v1", "{t}");
    assert_eq!(image["source"], "pull");
    assert_eq!(image["config"]["working_dir"], "/srv/app");
    assert_eq!(image["config"]["user"], "1000");
    assert!(image["digest"]
        .as_str()
        .is_some_and(|d| d.starts_with("sha256:")));
    let list = a.get("/images").await.expect(200);
    let names: Vec<(String, bool)> = list["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or("").to_owned(),
                i["shared"] == true,
            )
        })
        .collect();
    assert!(names.contains(&("app:v1".into(), false)), "{list}");
    assert!(names.contains(&("minimal".into(), true)), "{list}");
    assert_eq!(
        a.get("/tasks").await.expect(200)["tasks"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // A sandbox from it: the files, the whiteout, env, workdir, user.
    let sb = a
        .post(
            "/sandboxes",
            json!({"name": "app", "image": "app:v1", "env": {"EXTRA": "x"}}),
        )
        .await
        .expect(201);
    assert_eq!(sb["image"], "app:v1");
    let (code, out, err) = a
        .sh(
            "app",
            "cat hello.txt; echo \"$GREETING $EXTRA\"; pwd; id -u; test -e /srv/app/gone.txt && echo present || echo absent",
        )
        .await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(
        out, "hello from layer 1\nhi x\n/srv/app\n1000\nabsent\n",
        "stderr: {err}"
    );
    // An exec without a command runs the image's.
    let r = a
        .post("/sandboxes/app/exec", json!({"cmd": []}))
        .await
        .expect(200);
    assert_eq!(r["stdout"], "default-cmd hi\n", "{r}");

    // The first create from the image had its pre-booted snapshot built:
    // the next one is restored from it, with the image's defaults.
    let deadline = Instant::now() + Duration::from_secs(300);
    let twin = loop {
        let name = format!("twin{}", bhatti::engine::random_hex(4));
        let v = a
            .post("/sandboxes", json!({"name": name, "image": "app:v1"}))
            .await
            .expect(201);
        if v["origin"] == "instant" {
            break name;
        }
        a.delete(&format!("/sandboxes/{name}")).await.expect(204);
        assert!(Instant::now() < deadline, "never instant: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (code, out, err) = a
        .sh(&twin, "cat hello.txt; echo $GREETING; pwd; id -u; hostname")
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("hello from layer 1\nhi\n/srv/app\n1000\n{twin}\n")
    );
    a.delete(&format!("/sandboxes/{twin}")).await.expect(204);

    // The same digest again: at once, the same image (no rebuild).
    let started = Instant::now();
    let again = pull(&a, json!({"ref": reference})).await;
    assert_eq!(again["state"], "succeeded", "{again}");
    assert_eq!(again["image"]["created_at"], image["created_at"]);
    assert!(started.elapsed() < Duration::from_secs(10));

    // A ref nobody pulled yet: create pulls it on demand.
    a.post("/sandboxes", json!({"name": "ondemand", "image": v2}))
        .await
        .expect(201);
    a.get("/images/app:v2").await.expect(200);
    // Refs that cannot be pulled say why, as 4xx.
    a.post("/sandboxes", json!({"image": "no such:ref"}))
        .await
        .expect_err(400);
    let e = a
        .post(
            "/sandboxes",
            json!({"image": format!("{}/t/missing:v1", open.addr)}),
        )
        .await
        .expect_err(404);
    assert!(e.contains("missing"), "{e}");
    let bad = pull(&a, json!({"ref": format!("{}/Bad/Repo:1", open.addr)})).await;
    assert_eq!(bad["state"], "failed", "{bad}");
    assert_eq!(bad["error_status"], 400, "{bad}");
    a.post("/images/pull", json!({"ref": "a b"}))
        .await
        .expect_err(400);

    // The registry with a password: refused without, pulled with.
    let denied = pull(&a, json!({"ref": private, "name": "private"})).await;
    assert_eq!(denied["state"], "failed", "{denied}");
    assert_eq!(denied["error_status"], 401, "{denied}");
    let msg = denied["error"].as_str().unwrap_or("");
    assert!(msg.contains("unauthorized") && msg.contains("401"), "{msg}");
    let e = a
        .post("/sandboxes", json!({"image": private}))
        .await
        .expect_err(401);
    assert!(e.contains("unauthorized"), "{e}");
    let ok = pull(
        &a,
        json!({"ref": private, "name": "private", "auth": {"username": "bhatti", "password": "s3cret"}}),
    )
    .await;
    assert_eq!(ok["state"], "succeeded", "{ok}");

    // Delete: not while a template uses it; not a shared one; the disk goes.
    let disks = env.data_dir().join("images/disks");
    let before = files_under(&disks).len();
    let owner = user_id(&env, "alice");
    let store = bhatti::store::Store::open(env.data_dir().join("bhatti.db")).expect("store");
    store
        .with(|c| {
            c.execute(
                "INSERT INTO templates (id, owner, name, image, spec, created_at) VALUES ('tpl_t', ?1, 'web', 'private', '{}', 0)",
                [&owner],
            )?;
            Ok(())
        })
        .expect("template row");
    let e = a.delete("/images/private").await.expect_err(409);
    assert!(e.contains("template"), "{e}");
    store
        .with(|c| {
            c.execute("DELETE FROM templates WHERE id = 'tpl_t'", [])?;
            Ok(())
        })
        .expect("template row gone");
    a.delete("/images/private").await.expect(204);
    assert_eq!(files_under(&disks).len(), before - 1);
    a.get("/images/private").await.expect_err(404);
    a.delete("/images/minimal").await.expect_err(403);
    // Sandboxes keep their own disks.
    assert_eq!(a.sh("app", "cat hello.txt").await.1, "hello from layer 1\n");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_import_save_and_quota() {
    let Some((art, lohar)) = setup("images::cancel_import_save_and_quota") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let work = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(None);
    // A big layer, so the pull is still under way when it is cancelled.
    let big_dir = work.path().join("big");
    std::fs::create_dir(&big_dir).expect("big dir");
    let mut big = Layout::new(&big_dir, "v1");
    big.layer(|root| {
        busybox_root(root);
        let mut f = std::fs::File::create(root.join("random.bin")).expect("random");
        let mut src = std::fs::File::open("/dev/urandom").expect("urandom");
        std::io::copy(&mut std::io::Read::take(&mut src, 200 << 20), &mut f).expect("fill");
    });
    let big_ref = registry.push(&big.image, "t/big:v1", None);
    let small_dir = work.path().join("small");
    std::fs::create_dir(&small_dir).expect("small dir");
    let small = app_image(&small_dir);
    let docker_tar = work.path().join("app-docker.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}", small.image))
        .arg(format!("docker-archive:{}:app:v1", docker_tar.display())));
    let oci_tar = work.path().join("app-oci.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}", small.image))
        .arg(format!("oci-archive:{}", oci_tar.display())));

    let env = Env::new(art);
    let mut cfg = env.config();
    cfg.images.lohar = lohar;
    cfg.images.max_per_user = 3;
    let key = env.user("bob", UserCaps::default());
    let daemon = Daemon::start(&env, cfg).await;
    let b = env.client(Some(&key));
    let images_dir = env.data_dir().join("images");

    // Cancel while it downloads (or whatever it does by then).
    let v = b
        .post("/images/pull", json!({"ref": big_ref}))
        .await
        .expect(202);
    let id = v["task"]["id"].as_str().expect("id").to_owned();
    eventually("the pull to download", Duration::from_secs(120), || {
        let (b, id) = (b.clone(), id.clone());
        async move {
            let t = b.get(&format!("/tasks/{id}")).await.expect(200);
            (t["phase"] != "resolving" || t["state"] != "running").then_some(())
        }
    })
    .await;
    let t = b.delete(&format!("/tasks/{id}")).await.expect(200);
    assert_eq!(t["state"], "cancelled", "{t}");
    assert_eq!(
        b.get(&format!("/tasks/{id}")).await.expect(200)["state"],
        "cancelled"
    );
    let left = files_under(&images_dir);
    assert!(
        left.iter().all(|p| p.is_dir()),
        "a cancelled pull left files: {left:?}"
    );
    assert!(b.get("/images").await.expect(200)["images"]
        .as_array()
        .is_some_and(|l| l.iter().all(|i| i["shared"] == true)),);

    // Import: a docker-archive and an OCI archive.
    let body = std::fs::read(&docker_tar).expect("tarball");
    let r = b
        .send(
            hyper::Method::POST,
            "/images/import?name=imported",
            &[],
            body.into(),
        )
        .await
        .expect(201);
    assert_eq!(r["source"], "import");
    let body = std::fs::read(&oci_tar).expect("tarball");
    b.send(
        hyper::Method::POST,
        "/images/import?name=oci",
        &[],
        body.clone().into(),
    )
    .await
    .expect(201);
    b.send(
        hyper::Method::POST,
        "/images/import?name=oci",
        &[],
        body.into(),
    )
    .await
    .expect_err(409);
    b.send(
        hyper::Method::POST,
        "/images/import?name=junk",
        &[],
        "not a tarball".into(),
    )
    .await
    .expect_err(400);
    b.post("/sandboxes", json!({"name": "imp", "image": "imported"}))
        .await
        .expect(201);
    let (code, out, err) = b.sh("imp", "cat /srv/app/hello.txt; id -u").await;
    assert_eq!(
        (code, out.as_str()),
        (0, "hello from layer 1\n1000\n"),
        "{err}"
    );

    // Save a running sandbox's disk; a sandbox from it has the file, and
    // the source keeps running. The third image is past the quota.
    let (code, _, err) = b.sh("imp", "echo saved > /srv/app/marker && sync").await;
    assert_eq!(code, 0, "{err}");
    let saved = b
        .post("/sandboxes/imp/save-image", json!({"name": "saved"}))
        .await
        .expect(201);
    assert_eq!(saved["source"], "save");
    assert_eq!(saved["config"]["user"], "1000", "{saved}");
    let imp = b.get("/sandboxes/imp").await.expect(200);
    assert_eq!(imp["status"], "running", "{imp}");
    assert_eq!(b.sh("imp", "cat /srv/app/marker").await.1, "saved\n");
    b.post("/sandboxes", json!({"name": "fromsave", "image": "saved"}))
        .await
        .expect(201);
    let (code, out, err) = b.sh("fromsave", "cat /srv/app/marker; pwd").await;
    assert_eq!((code, out.as_str()), (0, "saved\n/srv/app\n"), "{err}");
    // Three images is bob's limit; deleting one makes room.
    let e = b
        .post("/sandboxes/imp/save-image", json!({"name": "saved2"}))
        .await
        .expect_err(429);
    assert!(e.contains("limit"), "{e}");
    b.delete("/images/oci").await.expect(204);
    b.post("/sandboxes/imp/save-image", json!({"name": "saved2"}))
        .await
        .expect(201);
    daemon.stop().await;
}
