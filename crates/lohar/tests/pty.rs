//! PTY sessions against the real agent in host test mode.

mod common;
mod proc_util;

use std::time::Duration;

use bhatti_protocol::client::{PtyEvent, PtyStream};
use bhatti_protocol::{AttachRequest, ErrorCode, ExecRequest, PtyEnd, PtyRequest};
use bytes::Bytes;
use common::*;
use proc_util::*;

const T: Duration = Duration::from_secs(30);

fn pty_req(argv: &[&str]) -> PtyRequest {
    PtyRequest {
        argv: Some(argv.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

fn sh() -> PtyRequest {
    PtyRequest {
        rows: 24,
        cols: 80,
        ..pty_req(&["/bin/sh"])
    }
}

/// Reads output into `buf` until it contains `needle`.
async fn read_until(s: &mut PtyStream, buf: &mut Vec<u8>, needle: &str) {
    let found = |b: &[u8]| String::from_utf8_lossy(b).contains(needle);
    while !found(buf) {
        match tokio::time::timeout(T, s.next()).await {
            Ok(Ok(PtyEvent::Output(b) | PtyEvent::Stderr(b))) => buf.extend_from_slice(&b),
            Ok(Ok(PtyEvent::Gap(g))) => panic!("unexpected gap {g:?}"),
            Ok(Ok(PtyEvent::End(e))) => panic!(
                "ended ({e:?}) before {needle:?}: {}",
                String::from_utf8_lossy(buf)
            ),
            Ok(Err(e)) => panic!("stream failed: {e}"),
            Err(_) => panic!(
                "no {needle:?} within {T:?}: {}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

/// Like `read_until`, but `buf` is indexed by absolute offset from the
/// stream's start offset and bytes lost in gaps are zeros.
async fn read_until_with_gaps(s: &mut PtyStream, buf: &mut Vec<u8>, needle: &str) {
    let found = |b: &[u8]| String::from_utf8_lossy(b).contains(needle);
    while !found(buf) {
        match tokio::time::timeout(T, s.next()).await {
            Ok(Ok(PtyEvent::Output(b) | PtyEvent::Stderr(b))) => buf.extend_from_slice(&b),
            Ok(Ok(PtyEvent::Gap(g))) => buf.resize(buf.len() + (g.to - g.from) as usize, 0),
            other => panic!("before {needle:?}: {other:?}"),
        }
    }
}

/// Reads everything up to the end of the stream.
async fn read_to_end(s: &mut PtyStream, buf: &mut Vec<u8>) -> PtyEnd {
    loop {
        match tokio::time::timeout(T, s.next()).await {
            Ok(Ok(PtyEvent::Output(b) | PtyEvent::Stderr(b))) => buf.extend_from_slice(&b),
            Ok(Ok(PtyEvent::Gap(g))) => panic!("unexpected gap {g:?}"),
            Ok(Ok(PtyEvent::End(e))) => return e,
            Ok(Err(e)) => panic!("stream failed: {e}"),
            Err(_) => panic!("no end within {T:?}"),
        }
    }
}

async fn write(s: &PtyStream, text: &str) {
    s.write(Bytes::from(text.to_owned())).await.unwrap();
}

#[tokio::test]
async fn shell_runs_commands() {
    let agent = Agent::start(&["--shell", "/bin/sh"]);
    let c = agent.client().await;
    // No argv: the login shell.
    let mut s = c.pty(PtyRequest::default()).await.unwrap();
    assert_eq!(s.start_offset, 0);
    assert!(s.gap.is_none());
    // The quotes keep the echoed input from matching.
    write(&s, "echo hel''lo-$TERM\n").await;
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, "hello-xterm-256color").await;
    write(&s, "exit 0\n").await;
    match read_to_end(&mut s, &mut buf).await {
        PtyEnd::Exited { status, offset } => {
            assert_eq!(status.exit_code, 0);
            assert_eq!(offset, buf.len() as u64);
        }
        other => panic!("expected exit, got {other:?}"),
    }
}

#[tokio::test]
async fn resize_is_visible_to_the_program() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut s = c.pty(sh()).await.unwrap();
    let mut buf = Vec::new();
    write(&s, "stty size; echo do''ne1\n").await;
    read_until(&mut s, &mut buf, "done1").await;
    assert!(String::from_utf8_lossy(&buf).contains("24 80"));
    s.resize(50, 132).unwrap();
    write(&s, "stty size; echo do''ne2\n").await;
    read_until(&mut s, &mut buf, "done2").await;
    assert!(String::from_utf8_lossy(&buf).contains("50 132"));
    let info = c.sessions().await.unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!((info[0].rows, info[0].cols), (50, 132));
    c.kill_session(&s.session, None).await.unwrap();
}

#[tokio::test]
async fn reattach_from_an_offset_is_exact() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut s = c.pty(sh()).await.unwrap();
    let id = s.session.clone();
    // Output keeps coming while we detach and reattach.
    write(
        &s,
        // `read` holds the end back until after the reattach, so the
        // second attachment always has output to deliver.
        "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done; read x; echo ALL''DONE\n",
    )
    .await;
    let mut first = Vec::new();
    read_until(&mut s, &mut first, "line-100\r\n").await;
    s.sender.cancel().unwrap();
    let end = read_to_end(&mut s, &mut first).await;
    assert_eq!(
        end,
        PtyEnd::Detached {
            offset: first.len() as u64
        }
    );
    drop(s);

    // A second connection, from exactly where the first stopped.
    let c2 = agent.client().await;
    let mut s2 = c2
        .attach(AttachRequest {
            session: id.clone(),
            offset: Some(first.len() as u64),
        })
        .await
        .unwrap();
    assert_eq!(s2.start_offset, first.len() as u64);
    assert!(s2.gap.is_none());
    let mut second = Vec::new();
    write(&s2, "go\n").await;
    read_until(&mut s2, &mut second, "ALLDONE").await;

    // The whole output from the start, held in the scrollback.
    let mut s3 = c2
        .attach(AttachRequest {
            session: id.clone(),
            offset: Some(0),
        })
        .await
        .unwrap();
    assert!(s3.gap.is_none());
    let mut all = Vec::new();
    read_until(&mut s3, &mut all, "ALLDONE").await;
    let joined = [first.as_slice(), second.as_slice()].concat();
    let n = joined.len().min(all.len());
    assert_eq!(
        String::from_utf8_lossy(&joined[..n]),
        String::from_utf8_lossy(&all[..n])
    );
    // Nothing lost or duplicated: every line exactly once.
    let text = String::from_utf8_lossy(&joined);
    for i in [0, 100, 101, 1500, 2999] {
        assert_eq!(
            text.matches(&format!("line-{i}\r\n")).count(),
            1,
            "line-{i}"
        );
    }
    let info = c2.sessions().await.unwrap();
    assert_eq!(info[0].attached, 2);
    c2.kill_session(&id, None).await.unwrap();
}

#[tokio::test]
async fn reattach_after_overflow_reports_a_gap() {
    let agent = Agent::start(&["--scrollback", "65536"]);
    let c = agent.client().await;
    let mut s = c.pty(sh()).await.unwrap();
    let id = s.session.clone();
    write(
        &s,
        "head -c 200000 /dev/zero | tr '\\0' x; echo; echo DO''NE\n",
    )
    .await;
    // This attachment may itself fall behind the small ring: fine.
    let mut buf = Vec::new();
    read_until_with_gaps(&mut s, &mut buf, "DONE").await;
    assert_eq!(buf.len() as u64, s.offset);

    let mut again = c
        .attach(AttachRequest {
            session: id.clone(),
            offset: Some(0),
        })
        .await
        .unwrap();
    let gap = again.gap.expect("a gap for offset 0");
    assert_eq!(gap.from, 0);
    assert_eq!(gap.to, again.start_offset);
    assert!(again.start_offset >= 200_000 - 65_536, "{gap:?}");
    let mut tail = Vec::new();
    read_until(&mut again, &mut tail, "DONE").await;
    // Replay starts at the ring's start: it is exactly that part of the
    // output the first attachment saw (where it saw it).
    // Compare up to the end of DONE only: the shell's next prompt may have
    // reached this attachment but not the first one, which stopped reading.
    let done = tail
        .windows(4)
        .position(|w| w == b"DONE")
        .expect("DONE in the replay")
        + 4;
    let start = again.start_offset as usize;
    let seen = &buf[start..start + done];
    assert!(seen
        .iter()
        .zip(&tail[..done])
        .all(|(a, b)| *a == 0 || a == b));
    assert!(tail.starts_with(b"xxxx"));
    assert!(String::from_utf8_lossy(&tail).contains("xx\r\nDONE"));

    // No offset: everything still held, without a gap.
    let held = c
        .attach(AttachRequest {
            session: id.clone(),
            offset: None,
        })
        .await
        .unwrap();
    assert!(held.gap.is_none());
    assert_eq!(held.start_offset, again.start_offset);

    // An offset beyond the end is refused.
    let err = c
        .attach(AttachRequest {
            session: id.clone(),
            offset: Some(u64::MAX / 2),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    c.kill_session(&id, None).await.unwrap();
}

#[tokio::test]
async fn a_live_attachment_that_falls_behind_gets_a_gap() {
    let agent = Agent::start(&["--scrollback", "65536"]);
    let c = agent.client().await;
    let slow = c.pty(sh()).await.unwrap();
    let id = slow.session.clone();
    let mut slow = slow;
    // Much more than the channel window plus the ring, while `slow` reads
    // nothing.
    write(
        &slow,
        "head -c 3000000 /dev/zero | tr '\\0' y; echo; echo FIN''ISHED\n",
    )
    .await;
    eventually("the output to pass 3 MB", T, || {
        let c = c.clone();
        async move {
            let s = c.sessions().await.ok()?;
            (s.first()?.end_offset > 3_000_000).then_some(())
        }
    })
    .await;
    let mut got = 0u64;
    let mut gaps = Vec::new();
    let mut tail = Vec::new();
    loop {
        match tokio::time::timeout(T, slow.next()).await {
            Ok(Ok(PtyEvent::Output(b))) => {
                got += b.len() as u64;
                tail.extend_from_slice(&b);
                if String::from_utf8_lossy(&tail).contains("FINISHED") {
                    break;
                }
                let keep = tail.len().saturating_sub(16);
                tail.drain(..keep);
            }
            Ok(Ok(PtyEvent::Gap(g))) => gaps.push(g),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(!gaps.is_empty(), "fell behind without a gap");
    let lost: u64 = gaps.iter().map(|g| g.to - g.from).sum();
    // Received plus reported-lost accounts for every byte exactly.
    assert_eq!(got + lost, slow.offset);
    assert!(slow.offset > 3_000_000);
    c.kill_session(&id, None).await.unwrap();
}

#[tokio::test]
async fn exit_status_is_kept_and_listed() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut s = c
        .pty(pty_req(&["sh", "-c", "echo bye; exit 7"]))
        .await
        .unwrap();
    let id = s.session.clone();
    let mut buf = Vec::new();
    let end = read_to_end(&mut s, &mut buf).await;
    assert_eq!(String::from_utf8_lossy(&buf), "bye\r\n");
    match end {
        PtyEnd::Exited { status, offset } => {
            assert_eq!(status.exit_code, 7);
            assert_eq!(offset, 5);
        }
        other => panic!("expected exit, got {other:?}"),
    }
    let list = c.sessions().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, id);
    assert_eq!(list[0].exit.map(|e| e.exit_code), Some(7));
    assert_eq!(list[0].end_offset, 5);
    assert_eq!(list[0].argv, ["sh", "-c", "echo bye; exit 7"]);
    // A late reattach replays, then ends with the same exit.
    let mut again = c
        .attach(AttachRequest {
            session: id,
            offset: Some(0),
        })
        .await
        .unwrap();
    let mut replay = Vec::new();
    let end2 = read_to_end(&mut again, &mut replay).await;
    assert_eq!(replay, buf);
    assert_eq!(end2, end);
    let a = c.activity().await.unwrap();
    assert_eq!(a.running_sessions, 0);
}

#[tokio::test]
async fn kill_ends_a_session() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut s = c.pty(pty_req(&["sleep", "300"])).await.unwrap();
    let pid = s.pid as i32;
    assert!(process_alive(pid));
    let a = c.activity().await.unwrap();
    assert_eq!((a.running_sessions, a.attached_sessions), (1, 1));
    c.kill_session(&s.session, None).await.unwrap();
    match read_to_end(&mut s, &mut Vec::new()).await {
        PtyEnd::Exited { status, .. } => {
            assert_eq!((status.exit_code, status.signal), (137, Some(9)))
        }
        other => panic!("expected exit, got {other:?}"),
    }
    assert!(!process_alive(pid));
    let err = c.kill_session("nope", None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = c
        .attach(AttachRequest {
            session: "nope".into(),
            offset: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
}

#[tokio::test]
async fn disconnect_detaches_and_the_session_runs_on() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut s = c.pty(sh()).await.unwrap();
    let id = s.session.clone();
    let mut buf = Vec::new();
    write(&s, "echo fir''st\n").await;
    read_until(&mut s, &mut buf, "first").await;
    c.close();
    drop(s);
    drop(c);
    let c2 = agent.client().await;
    let c2r = c2.clone();
    eventually("the session to be detached", T, || {
        let c = c2r.clone();
        async move {
            let s = c.sessions().await.ok()?;
            (s.len() == 1 && s[0].attached == 0 && s[0].exit.is_none()).then_some(())
        }
    })
    .await;
    let mut s2 = c2
        .attach(AttachRequest {
            session: id.clone(),
            offset: Some(buf.len() as u64),
        })
        .await
        .unwrap();
    write(&s2, "echo sec''ond\n").await;
    let mut more = Vec::new();
    read_until(&mut s2, &mut more, "second").await;
    c2.kill_session(&id, None).await.unwrap();
}

#[tokio::test]
async fn the_session_limit_is_enforced() {
    let agent = Agent::start(&["--max-sessions", "2"]);
    let c = agent.client().await;
    let mut a = c.pty(pty_req(&["sleep", "300"])).await.unwrap();
    let mut b = c.pty(pty_req(&["sleep", "300"])).await.unwrap();
    let err = c.pty(pty_req(&["sleep", "300"])).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitReached));
    assert_eq!(c.sessions().await.unwrap().len(), 2);
    for s in [&mut a, &mut b] {
        c.kill_session(&s.session, None).await.unwrap();
        let end = read_to_end(s, &mut Vec::new()).await;
        assert!(matches!(end, PtyEnd::Exited { .. }), "{end:?}");
    }
    // Both were read to the end: a full table drops the oldest for a new one.
    let d = c.pty(pty_req(&["sleep", "300"])).await.unwrap();
    let mut e = c.pty(pty_req(&["sleep", "300"])).await.unwrap();
    assert_eq!(c.sessions().await.unwrap().len(), 2);
    // A session that exits with nobody attached was not read to the end: it
    // still counts until its grace period ends.
    let unread = d.session.clone();
    drop(d);
    let gone = |attached: bool| {
        let (c, id) = (c.clone(), unread.clone());
        move || {
            let (c, id) = (c.clone(), id.clone());
            async move {
                let s = c.sessions().await.ok()?;
                let s = s.into_iter().find(|s| s.id == id)?;
                (if attached {
                    s.attached == 0
                } else {
                    s.exit.is_some()
                })
                .then_some(())
            }
        }
    };
    eventually("the dropped client to detach", T, gone(true)).await;
    c.kill_session(&unread, None).await.unwrap();
    eventually("the unread session to exit", T, gone(false)).await;
    let err = c.pty(pty_req(&["true"])).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitReached));
    c.kill_session(&e.session, None).await.unwrap();
    read_to_end(&mut e, &mut Vec::new()).await;
}

#[tokio::test]
async fn a_stalled_pty_client_does_not_block_execs() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    // Endless output on a session whose client reads nothing.
    let s = c.pty(pty_req(&["yes"])).await.unwrap();
    for i in 0..3 {
        let out = tokio::time::timeout(
            T,
            c.exec(
                ExecRequest {
                    argv: vec!["echo".into(), i.to_string()],
                    ..Default::default()
                },
                None,
            ),
        )
        .await
        .expect("an exec behind a stalled PTY")
        .unwrap();
        assert_eq!(out.stdout, Bytes::from(format!("{i}\n")));
    }
    // The session itself keeps running past the window and the ring.
    eventually("the session to keep producing", T, || {
        let c = c.clone();
        async move {
            let s = c.sessions().await.ok()?;
            (s.first()?.end_offset > 4_000_000).then_some(())
        }
    })
    .await;
    c.kill_session(&s.session, None).await.unwrap();
}

#[tokio::test]
async fn input_sent_just_before_detach_is_delivered() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let marker = agent.path("marker");
    for round in 0..20 {
        let s = c.pty(sh()).await.unwrap();
        let id = s.session.clone();
        let target = format!("{}-{round}", marker.display());
        // Write and detach at once, without waiting for the echo.
        write(&s, &format!("echo done > {target}\n")).await;
        let end = s.detach().await.unwrap();
        assert!(matches!(end, PtyEnd::Detached { .. }));
        let p = std::path::PathBuf::from(&target);
        eventually(
            "the command typed before detaching to run",
            Duration::from_secs(10),
            || {
                let p = p.clone();
                async move { p.exists().then_some(()) }
            },
        )
        .await;
        c.kill_session(&id, None).await.unwrap();
    }
}

fn piped(argv: &[&str]) -> PtyRequest {
    PtyRequest {
        piped: true,
        ..pty_req(argv)
    }
}

/// Reads a piped session to its end: (stdout+stderr in order, stderr only, end).
async fn read_piped_to_end(s: &mut PtyStream) -> (Vec<u8>, Vec<u8>, PtyEnd) {
    let (mut all, mut err) = (Vec::new(), Vec::new());
    loop {
        match tokio::time::timeout(T, s.next()).await {
            Ok(Ok(PtyEvent::Output(b))) => all.extend_from_slice(&b),
            Ok(Ok(PtyEvent::Stderr(b))) => {
                all.extend_from_slice(&b);
                err.extend_from_slice(&b)
            }
            Ok(Ok(PtyEvent::End(e))) => return (all, err, e),
            other => panic!("piped session: {other:?}"),
        }
    }
}

#[tokio::test]
async fn piped_session_keeps_streams_apart_and_takes_stdin() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut s = c
        .pty(piped(&[
            "/bin/sh",
            "-c",
            "echo out; echo err >&2; tr a-z A-Z",
        ]))
        .await
        .unwrap();
    s.write(Bytes::from_static(b"hello\n")).await.unwrap();
    s.close_stdin().unwrap();
    let (all, err, end) = read_piped_to_end(&mut s).await;
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    let all = String::from_utf8_lossy(&all);
    assert!(all.contains("out\n") && all.ends_with("HELLO\n"), "{all:?}");
    match end {
        PtyEnd::Exited { status, offset } => {
            assert_eq!(status.exit_code, 0);
            assert_eq!(offset, all.len() as u64);
        }
        other => panic!("expected exit, got {other:?}"),
    }
    // Stderr stays stderr on a replay from an offset inside it.
    let info = c.sessions().await.unwrap();
    assert!(info[0].piped);
    let at = all.find("err").unwrap() as u64 + 1;
    let mut s2 = c
        .attach(AttachRequest {
            session: s.session.clone(),
            offset: Some(at),
        })
        .await
        .unwrap();
    match tokio::time::timeout(T, s2.next()).await {
        Ok(Ok(PtyEvent::Stderr(b))) => assert_eq!(&b[..], b"rr\n"),
        other => panic!("expected stderr, got {other:?}"),
    }
}

#[tokio::test]
async fn piped_session_reattach_and_kill() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let mut s = c
        .pty(piped(&[
            "/bin/sh",
            "-c",
            "i=1; while [ $i -le 2000 ]; do echo line-$i; i=$((i+1)); done; read x; echo done-$x; sleep 600",
        ]))
        .await
        .unwrap();
    let id = s.session.clone();
    let mut first = Vec::new();
    read_until(&mut s, &mut first, "line-50\n").await;
    let end = s.detach().await.unwrap();
    let PtyEnd::Detached { offset } = end else {
        panic!("{end:?}")
    };
    assert!(offset >= first.len() as u64);
    // The detach drained what was in flight: resume from the first
    // stream's own count.
    let c2 = agent.client().await;
    let mut s2 = c2
        .attach(AttachRequest {
            session: id.clone(),
            offset: Some(first.len() as u64),
        })
        .await
        .unwrap();
    s2.write(Bytes::from_static(b"x\n")).await.unwrap();
    let mut second = Vec::new();
    read_until(&mut s2, &mut second, "done-x\n").await;
    let text = String::from_utf8_lossy(&[first, second].concat()).into_owned();
    let want: String = (1..=2000).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(text, format!("{want}done-x\n"));
    c2.kill_session(&id, None).await.unwrap();
    match read_to_end(&mut s2, &mut Vec::new()).await {
        PtyEnd::Exited { status, .. } => assert_eq!(status.exit_code, 128 + 9),
        other => panic!("{other:?}"),
    }
}

/// A holding piped session loses nothing to a slow attached reader: 4 MiB
/// through a 256 KiB scrollback, read with pauses, arrive whole and in
/// order; detached, the session drains (the command finishes unread).
#[tokio::test]
async fn a_holding_piped_session_loses_nothing_to_a_slow_reader() {
    let agent = Agent::start(&[]);
    let c = agent.client().await;
    let script = "i=0; while [ $i -lt 64 ]; do head -c 65536 /dev/zero | tr '\\0' x; i=$((i+1)); done; echo end";
    let mut s = c
        .pty(PtyRequest {
            hold: true,
            ..piped(&["/bin/sh", "-c", script])
        })
        .await
        .unwrap();
    let mut n = 0usize;
    let mut last = Vec::new();
    loop {
        match tokio::time::timeout(T, s.next()).await {
            Ok(Ok(PtyEvent::Output(b))) => {
                n += b.len();
                last = b.to_vec();
                if n < 1 << 20 {
                    // Slower than the writer at first.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Ok(Ok(PtyEvent::End(PtyEnd::Exited { status, .. }))) => {
                assert_eq!(status.exit_code, 0);
                break;
            }
            other => panic!("holding session: {other:?}"),
        }
    }
    assert_eq!(n, 64 * 65536 + 4, "every byte, no gap");
    assert!(last.ends_with(b"end\n"));
    // Without an attachment it does not hold.
    let s = c
        .pty(PtyRequest {
            hold: true,
            ..piped(&["/bin/sh", "-c", script])
        })
        .await
        .unwrap();
    let id = s.session.clone();
    s.detach().await.unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let info = c.sessions().await.unwrap();
        let me = info.iter().find(|i| i.id == id).expect("the session");
        if me.exit.is_some() {
            assert_eq!(me.end_offset, 64 * 65536 + 4);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "it never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
