//! `reidentify` in test mode (not PID 1): only the token changes. The open
//! connection stays usable; new connections need the new token. The
//! hostname, network, machine id and entropy parts run on real VMs
//! (crates/bhatti/tests/api_e2e.rs forks a checkpoint).

mod common;

use bhatti_protocol::handshake::{client_hello, HandshakeError};
use bhatti_protocol::{AgentClient, ErrorCode, ReidentifyRequest};
use common::*;

fn req(token: &str) -> ReidentifyRequest {
    ReidentifyRequest {
        token: token.into(),
        hostname: "fork-1".into(),
        sandbox_id: "sb-new".into(),
        mac: Some("02:00:0a:4d:00:09".into()),
        address: Some("10.77.0.9/24".into()),
        gateway: Some("10.77.0.1".parse().expect("ip")),
        entropy: Some("00ff".repeat(16)),
        env: None,
    }
}

#[tokio::test]
async fn reidentify_replaces_the_token_only_in_test_mode() {
    let agent = TestAgent::start(&[]);
    let old = agent.client().await;
    let hostname = nix::unistd::gethostname().expect("hostname");
    let done = old
        .reidentify(req("new-token-123"))
        .await
        .expect("reidentify");
    assert_eq!(done.applied, vec!["token".to_string()]);
    assert!(done.failed.is_empty());
    assert_eq!(
        nix::unistd::gethostname().expect("hostname"),
        hostname,
        "the host is untouched"
    );
    // The connection that asked stays open.
    old.ping().await.expect("old connection still works");
    // New connections: the old token is refused, the new one accepted.
    let mut s = agent.raw().await;
    match client_hello(&mut s, TOKEN).await {
        Err(HandshakeError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("the old token should be refused, got {other:?}"),
    }
    let c = AgentClient::connect(agent.raw().await, "new-token-123")
        .await
        .expect("new token");
    c.ping().await.expect("ping");
}

#[tokio::test]
async fn reidentify_rejects_bad_input_and_changes_nothing() {
    let agent = TestAgent::start(&[]);
    let c = agent.client().await;
    let mut bad = vec![
        ReidentifyRequest {
            token: String::new(),
            ..req("x")
        },
        ReidentifyRequest {
            hostname: "bad host".into(),
            ..req("x")
        },
        ReidentifyRequest {
            mac: Some("zz:00:00:00:00:00".into()),
            ..req("x")
        },
        ReidentifyRequest {
            address: Some("10.0.0.1".into()),
            ..req("x")
        },
        ReidentifyRequest {
            entropy: Some("abc".into()),
            ..req("x")
        },
        ReidentifyRequest {
            env: Some([("A=B".to_string(), "x".to_string())].into()),
            ..req("x")
        },
    ];
    for r in bad.drain(..) {
        let e = c.reidentify(r.clone()).await.expect_err("rejected");
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{r:?}: {e}");
    }
    // The original token still works.
    agent.client().await.ping().await.expect("token unchanged");
}

#[tokio::test]
async fn reidentify_replaces_the_sandbox_env() {
    let agent = TestAgent::start(&[]);
    let c = agent.client().await;
    let env = [("FROM_TEMPLATE".to_string(), "no".to_string())].into();
    let done = c
        .reidentify(ReidentifyRequest {
            env: Some(env),
            ..req("tok-env-1")
        })
        .await
        .expect("reidentify");
    assert!(done.applied.contains(&"env".to_string()), "{done:?}");
    let c = AgentClient::connect(agent.raw().await, "tok-env-1")
        .await
        .expect("new token");
    let r = bhatti_protocol::ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "echo $FROM_TEMPLATE".into()],
        ..Default::default()
    };
    let out = c.exec(r, None).await.expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no");
}
