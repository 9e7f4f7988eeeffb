//! Piped exec against the real agent in host test mode.

mod common;
mod proc_util;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use bhatti_protocol::client::{ExecEvent, ExecStream};
use bhatti_protocol::{ErrorCode, ExecRequest, ExitStatus};
use bytes::Bytes;
use common::*;
use proc_util::*;

const T: Duration = Duration::from_secs(30);

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    req(&["sh", "-c", script])
}

/// Reads a stream until its stdout has a full first line; returns it.
async fn first_line(stream: &mut ExecStream) -> String {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(T, stream.next()).await {
            Ok(Ok(ExecEvent::Stdout(b))) => {
                out.extend_from_slice(&b);
                if let Some(i) = out.iter().position(|&c| c == b'\n') {
                    return String::from_utf8_lossy(&out[..i]).into_owned();
                }
            }
            Ok(Ok(ExecEvent::Exit(s))) => panic!("exited early: {s:?}"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("stream failed: {e}"),
            Err(_) => panic!("no line within {T:?}"),
        }
    }
}

/// Drains a stream to its exit status.
async fn exit_of(stream: &mut ExecStream) -> ExitStatus {
    loop {
        match tokio::time::timeout(T, stream.next()).await {
            Ok(Ok(ExecEvent::Exit(s))) => return s,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("stream failed: {e}"),
            Err(_) => panic!("no exit within {T:?}"),
        }
    }
}

async fn gone(what: &str, pid: i32) {
    eventually(
        what,
        T,
        || async move { (!process_alive(pid)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn output_and_exit_codes() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let out = c
        .exec(sh("echo out; echo err >&2; exit 3"), None)
        .await
        .unwrap();
    assert_eq!(&out.stdout[..], b"out\n");
    assert_eq!(&out.stderr[..], b"err\n");
    assert_eq!(out.status.exit_code, 3);
    assert_eq!(out.status.signal, None);
    assert!(!out.status.timed_out);
    assert!(out.pid > 0);

    let out = c.exec(req(&["true"]), None).await.unwrap();
    assert_eq!(out.status.exit_code, 0);
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
}

#[tokio::test]
async fn started_event_unless_asked_not_to() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    for skip in [false, true] {
        let mut r = sh("echo $$");
        r.no_started_event = skip;
        let mut s = c.exec_stream(r).await.unwrap();
        let mut started = None;
        let mut stdout = Vec::new();
        let status = loop {
            match tokio::time::timeout(T, s.next()).await {
                Ok(Ok(ExecEvent::Started { pid })) => started = Some(pid),
                Ok(Ok(ExecEvent::Stdout(b))) => stdout.extend_from_slice(&b),
                Ok(Ok(ExecEvent::Exit(st))) => break st,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("stream failed: {e}"),
                Err(_) => panic!("no exit within {T:?}"),
            }
        };
        let shell_pid: u32 = String::from_utf8_lossy(&stdout).trim().parse().unwrap();
        // Either way the exit status names the process.
        assert_eq!(status.pid, Some(shell_pid), "skip={skip}");
        assert_eq!(started, (!skip).then_some(shell_pid), "skip={skip}");
    }
}

#[tokio::test]
async fn killed_by_signal_is_128_plus_n() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let out = c.exec(sh("kill -TERM $$"), None).await.unwrap();
    assert_eq!(out.status.exit_code, 128 + 15);
    assert_eq!(out.status.signal, Some(15));

    // A Signal control goes to the whole group, background jobs included.
    // (SIGTERM: dash catches SIGINT under -c, which makes SIGINT racy.)
    let mut s = c
        .exec_stream(sh("sleep 300 & echo $!; wait"))
        .await
        .unwrap();
    let background: i32 = first_line(&mut s).await.parse().unwrap();
    s.signal(libc::SIGTERM).unwrap();
    let st = exit_of(&mut s).await;
    assert_eq!((st.exit_code, st.signal), (128 + 15, Some(15)));
    gone("the background sleep", background).await;
}

#[tokio::test]
async fn environment_and_cwd() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let dir = agent.path("work");
    std::fs::create_dir(&dir).unwrap();
    let mut r = sh(
        "echo $FOO; echo $TERM; echo $LANG; echo $PATH; pwd; env | grep -c SECRET_OF_HOST || true",
    );
    r.env = BTreeMap::from([("FOO".to_string(), "bar baz".to_string())]);
    r.cwd = Some(dir.to_string_lossy().into_owned());
    // The host's environment must not leak into the command.
    let out = c.exec(r, None).await.unwrap();
    let text = String::from_utf8(out.stdout.to_vec()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "bar baz");
    assert_eq!(lines[1], "dumb");
    assert_eq!(lines[2], "C.UTF-8");
    assert!(lines[3].contains("/usr/bin"), "{text}");
    assert_eq!(lines[4], dir.canonicalize().unwrap().to_string_lossy());
    assert_eq!(lines[5], "0");
    assert_eq!(out.status.exit_code, 0);
}

#[tokio::test]
async fn workdir_is_the_default_cwd() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().canonicalize().unwrap();
    let agent = Agent::start(&["--workdir", work.to_str().unwrap()]);
    let c = agent.client().await;
    let out = c.exec(req(&["pwd"]), None).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        work.to_string_lossy()
    );
    // A request's own cwd still wins.
    let mut r = req(&["pwd"]);
    r.cwd = Some("/".into());
    let out = c.exec(r, None).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/");
}

#[tokio::test]
async fn bad_requests_are_errors_not_crashes() {
    let mut agent = Agent::start(&[]);
    let c = agent.client().await;
    let err = c.exec(req(&[]), None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    let err = c
        .exec(req(&["/no/such/binary-xyz"]), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    let err = c
        .exec(req(&["no-such-binary-xyz"]), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    let mut r = req(&["true"]);
    r.cwd = Some("/no/such/dir".into());
    let err = c.exec(r, None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert!(agent.0.alive());
    c.ping().await.unwrap();
}

#[tokio::test]
async fn stdin_streams_until_eof() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut r = req(&["cat"]);
    r.stdin = true;
    let mut s = c.exec_stream(r).await.unwrap();
    // Each line comes back before EOF: stdin is streamed, not buffered.
    for i in 0..3 {
        s.write_stdin(Bytes::from(format!("line {i}\n")))
            .await
            .unwrap();
        assert_eq!(first_line(&mut s).await, format!("line {i}"));
    }
    s.close_stdin().unwrap();
    assert_eq!(exit_of(&mut s).await.exit_code, 0);

    // A large input, fed concurrently with the output.
    let input = Bytes::from(vec![b'z'; 3 << 20]);
    let out = c.exec(req(&["wc", "-c"]), Some(input)).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3145728");
}

#[tokio::test]
async fn stdout_and_stderr_stay_apart() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let out = c
        .exec(
            sh("head -c 1000000 /dev/zero | tr '\\0' a & head -c 700000 /dev/zero | tr '\\0' b >&2; wait"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 1_000_000);
    assert_eq!(out.stderr.len(), 700_000);
    assert!(out.stdout.iter().all(|&b| b == b'a'));
    assert!(out.stderr.iter().all(|&b| b == b'b'));
    assert_eq!(out.status.exit_code, 0);
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut r = sh("sleep 300 & echo $!; wait");
    r.timeout_ms = Some(300);
    let mut s = c.exec_stream(r).await.unwrap();
    let grandchild: i32 = first_line(&mut s).await.parse().unwrap();
    assert!(process_alive(grandchild));
    let st = exit_of(&mut s).await;
    // Documented choice: 128 + SIGKILL with timed_out set.
    assert!(st.timed_out);
    assert_eq!((st.exit_code, st.signal), (137, Some(9)));
    gone("the grandchild sleep", grandchild).await;
}

#[tokio::test]
async fn cancel_kills_the_whole_group() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut s = c
        .exec_stream(sh("sleep 300 & echo $!; wait"))
        .await
        .unwrap();
    let leader = match tokio::time::timeout(T, s.next()).await {
        Ok(Ok(ExecEvent::Started { pid })) => pid as i32,
        other => panic!("expected Started, got {other:?}"),
    };
    let grandchild: i32 = first_line(&mut s).await.parse().unwrap();
    s.cancel().unwrap();
    let st = exit_of(&mut s).await;
    assert_eq!(st.signal, Some(9));
    assert!(!st.timed_out);
    gone("the leader", leader).await;
    gone("the grandchild", grandchild).await;
    c.ping().await.unwrap();
}

#[tokio::test]
async fn dropped_connection_kills_the_whole_group() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut s = c
        .exec_stream(sh("sleep 300 & echo $!; wait"))
        .await
        .unwrap();
    let leader = match tokio::time::timeout(T, s.next()).await {
        Ok(Ok(ExecEvent::Started { pid })) => pid as i32,
        other => panic!("expected Started, got {other:?}"),
    };
    let grandchild: i32 = first_line(&mut s).await.parse().unwrap();
    c.close();
    drop(s);
    drop(c);
    gone("the leader", leader).await;
    gone("the grandchild", grandchild).await;
    // The agent serves new connections as before.
    agent.client().await.ping().await.unwrap();
}

#[tokio::test]
async fn detached_survives_disconnect_and_writes_its_file() {
    let agent = Agent::start(&[]);
    let out_file = agent.path("detached.log");
    let stop = agent.path("stop");
    let c = agent.client().await;
    let mut r = sh(&format!(
        "echo started $$; while [ ! -e {} ]; do sleep 0.02; done; echo finished >&2",
        stop.display()
    ));
    r.output_file = Some(out_file.to_string_lossy().into_owned());
    let d = c.exec_detached(r).await.unwrap();
    assert_eq!(d.output_file, out_file.to_string_lossy());
    let pid = d.pid as i32;
    let expect = format!("started {pid}\n");
    let f = out_file.clone();
    eventually("the first output line", T, || {
        let f = f.clone();
        let expect = expect.clone();
        async move { (std::fs::read_to_string(&f).ok()? == expect).then_some(()) }
    })
    .await;
    c.close();
    drop(c);
    // A full round trip on a new connection after the old one is gone.
    let c2 = agent.client().await;
    c2.exec(req(&["true"]), None).await.unwrap();
    assert!(
        process_alive(pid),
        "the detached command died with its connection"
    );
    std::fs::write(&stop, b"").unwrap();
    let f = out_file.clone();
    eventually("the last output line", T, || {
        let f = f.clone();
        async move { (std::fs::read_to_string(&f).ok()?.ends_with("finished\n")).then_some(()) }
    })
    .await;
    gone("the detached command", pid).await;
}

#[tokio::test]
async fn fifty_parallel_execs_on_one_connection() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let r = req(&[
                    "sh",
                    "-c",
                    "echo out-$0; echo err-$0 >&2; exit $(($0 % 7))",
                    &i.to_string(),
                ]);
                (i, c.exec(r, None).await)
            })
        })
        .collect();
    for t in tasks {
        let (i, out) = t.await.unwrap();
        let out = out.unwrap();
        assert_eq!(out.stdout, Bytes::from(format!("out-{i}\n")));
        assert_eq!(out.stderr, Bytes::from(format!("err-{i}\n")));
        assert_eq!(out.status.exit_code, i % 7);
    }
}

#[tokio::test]
async fn slow_reader_does_not_block_other_execs() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    // Endless output nobody reads: it must stall only its own pipes.
    let mut flood = c.exec_stream(req(&["yes"])).await.unwrap();
    let leader = match tokio::time::timeout(T, flood.next()).await {
        Ok(Ok(ExecEvent::Started { pid })) => pid as i32,
        other => panic!("expected Started, got {other:?}"),
    };
    for i in 0..5 {
        let out = tokio::time::timeout(T, c.exec(req(&["echo", &i.to_string()]), None))
            .await
            .expect("an exec behind a stalled one")
            .unwrap();
        assert_eq!(out.stdout, Bytes::from(format!("{i}\n")));
    }
    assert!(process_alive(leader));
    flood.cancel().unwrap();
    assert_eq!(exit_of(&mut flood).await.signal, Some(9));
    gone("yes", leader).await;
}

#[tokio::test]
async fn runs_as_uid_1000() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let home_s = home.path().to_string_lossy().into_owned();
    let agent = Agent::start(&["--uid", "1000", "--gid", "1000", "--home", &home_s]);
    let c = agent.client().await;
    let out = c
        .exec(sh("id -u; id -g; id -G; echo $USER $HOME; pwd"), None)
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout.to_vec()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..3], ["1000", "1000", "1000"], "{text}");
    assert_eq!(lines[3], format!("lohar {home_s}"));
    assert_eq!(
        lines[4],
        home.path().canonicalize().unwrap().to_string_lossy()
    );

    // A detached command's new output file belongs to the user.
    let log = home.path().join("out.log");
    let mut r = sh("id -u");
    r.output_file = Some(log.to_string_lossy().into_owned());
    let d = c.exec_detached(r).await.unwrap();
    let l = log.clone();
    eventually("the detached output", T, || {
        let l = l.clone();
        async move { (std::fs::read_to_string(&l).ok()? == "1000\n").then_some(()) }
    })
    .await;
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    gone("the detached command", d.pid as i32).await;
}

#[tokio::test]
async fn children_and_orphans_are_reaped() {
    let agent = Agent::start(&[]);
    let agent_pid = agent.pid() as i32;
    let c = agent.client().await;
    for _ in 0..10 {
        c.exec(req(&["true"]), None).await.unwrap();
    }
    // The shell exits at once; its background sleep becomes an orphan that
    // the agent (a subreaper) inherits and must reap when it exits.
    let out = c
        .exec(sh("sleep 0.3 >/dev/null 2>&1 & echo $!"), None)
        .await
        .unwrap();
    let orphan: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    eventually("the orphan to be reaped", T, || async move {
        (!pid_exists(orphan)).then_some(())
    })
    .await;
    eventually("no zombie children of the agent", T, || async move {
        zombie_children(agent_pid).is_empty().then_some(())
    })
    .await;
    // A detached command is reaped too once it ends.
    let d = c.exec_detached(req(&["true"])).await.unwrap();
    let pid = d.pid as i32;
    eventually("the detached command to be reaped", T, || async move {
        (!pid_exists(pid)).then_some(())
    })
    .await;
}
