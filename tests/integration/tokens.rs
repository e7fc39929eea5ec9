//! Access tokens against the real server: every way a token can be wrong has its own error,
//! a valid token joins, the development token endpoint exists only in development mode,
//! `plaza token` mints tokens the server accepts, and secrets stay out of logs and `--help`.

use plaza_testkit::support::{self, RawWs, TestServer, http_get, test_config};

use plaza::auth::{self, ApiKey, Claims, DEFAULT_TTL, KeySet, Verifier};
use plaza::signal::{ClientMessage, ErrorCode, ServerMessage};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const KEY: &str = "prod-key";
const SECRET: &str = "prod-secret-7f9a2c4e6b8d0f1a3c5e7b9d1f3a5c7e";

fn prod_key() -> ApiKey {
    ApiKey::new(KEY, SECRET)
}

fn keys() -> KeySet {
    std::iter::once(prod_key()).collect()
}

async fn server_with_keys() -> TestServer {
    TestServer::start_with(plaza::config::Config {
        keys: keys(),
        ..test_config()
    })
    .await
}

fn claims(room: &str) -> Claims {
    Claims::new("alice-1", room, DEFAULT_TTL).with_name("Alice")
}

fn mint(key: &ApiKey, claims: &Claims) -> String {
    auth::mint(key, claims).unwrap()
}

/// Sends a join with `token`; the error code and message it gets (the socket stays open).
async fn refused(ws: &mut RawWs, room: &str, token: Option<&str>) -> (ErrorCode, String) {
    ws.send_msg(&ClientMessage::Join {
        room: room.into(),
        name: "mallory".into(),
        token: token.map(str::to_owned),
        protocol: None,
        auto_subscribe: None,
        timeline_events: None,
    })
    .await
    .unwrap();
    let (code, message, request) = ws.expect_error().await.unwrap();
    assert_eq!(request.as_deref(), Some("join"), "{message}");
    (code, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_failure_has_its_own_code_and_a_valid_token_joins() {
    let server = server_with_keys().await;
    let mut ws = RawWs::connect(&server.ws_url()).await.unwrap();
    let now = auth::unix_now();

    let expired = mint(
        &prod_key(),
        &Claims {
            exp: now - 3600,
            nbf: Some(now - 7200),
            ..claims("stage")
        },
    );
    let early = mint(
        &prod_key(),
        &Claims {
            nbf: Some(now + 3600),
            ..claims("stage")
        },
    );
    let mut no_join = claims("stage");
    no_join.grants.room_join = false;
    let forged = mint(
        &ApiKey::new(KEY, "not-the-secret-0123456789abcdefghijklm"),
        &claims("stage"),
    );
    let cases: Vec<(&str, Option<String>, ErrorCode, &str)> = vec![
        (
            "missing",
            None,
            ErrorCode::TokenMissing,
            "needs an access token",
        ),
        (
            "malformed",
            Some("definitely-not-a-jwt".into()),
            ErrorCode::TokenInvalid,
            "malformed",
        ),
        (
            "bad signature",
            Some(forged),
            ErrorCode::TokenInvalid,
            "signature",
        ),
        (
            "unknown key",
            Some(mint(&ApiKey::new("other-key", SECRET), &claims("stage"))),
            ErrorCode::TokenInvalid,
            "unknown API key \"other-key\"",
        ),
        (
            "the development key on a server with keys",
            Some(auth::dev_token("stage", "dev")),
            ErrorCode::TokenInvalid,
            "unknown API key \"devkey\"",
        ),
        ("expired", Some(expired), ErrorCode::TokenExpired, "expired"),
        (
            "not yet valid",
            Some(early),
            ErrorCode::TokenNotYetValid,
            "not valid for another",
        ),
        (
            "wrong room",
            Some(mint(&prod_key(), &claims("backstage"))),
            ErrorCode::TokenWrongRoom,
            "\"backstage\", not \"stage\"",
        ),
        (
            "join not granted",
            Some(mint(&prod_key(), &no_join)),
            ErrorCode::PermissionDenied,
            "roomJoin",
        ),
    ];
    for (what, token, want, says) in &cases {
        let (code, message) = refused(&mut ws, "stage", token.as_deref()).await;
        assert_eq!(code, *want, "{what}: {message}");
        assert!(message.contains(says), "{what}: {message:?} lacks {says:?}");
        assert!(!message.contains(SECRET), "{what}: {message}");
    }

    // Counted for the operator.
    let (_, health) = server.healthz().await.unwrap();
    assert_eq!(
        health["http"]["token_refusals"],
        cases.len() as u64,
        "{health}"
    );

    // The same socket may retry with a valid token; the join may leave the room to it.
    let good = mint(&prod_key(), &claims("stage"));
    let alice = ws.join_with("", "ignored", Some(&good)).await.unwrap();
    // Another participant sees the token's display name, in the token's room.
    let mut bob = RawWs::connect(&server.ws_url()).await.unwrap();
    let bob_token = mint(
        &prod_key(),
        &Claims::new("bob-1", "stage", DEFAULT_TTL).with_name("Bob"),
    );
    bob.send_msg(&ClientMessage::Join {
        room: "stage".into(),
        name: "bob".into(),
        token: Some(bob_token),
        protocol: None,
        auto_subscribe: None,
        timeline_events: None,
    })
    .await
    .unwrap();
    match bob
        .recv_until("joined", |m| matches!(m, ServerMessage::Joined { .. }))
        .await
        .unwrap()
    {
        ServerMessage::Joined {
            room, participants, ..
        } => {
            assert_eq!(room, "stage");
            let names: Vec<_> = participants.iter().map(|p| (&p.id, &p.name)).collect();
            assert_eq!(names, [(&alice, &"Alice".to_owned())]);
        }
        other => panic!("{other:?}"),
    }
    bob.close().await;
    ws.close().await;
    server.shutdown().await;
}

/// Development mode: a join without a token is still refused; development tokens join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_still_needs_a_token() {
    let server = TestServer::start().await;
    let mut ws = RawWs::connect(&server.ws_url()).await.unwrap();
    let (code, _) = refused(&mut ws, "demo", None).await;
    assert_eq!(code, ErrorCode::TokenMissing);
    let (code, _) = refused(&mut ws, "demo", Some(&mint(&prod_key(), &claims("demo")))).await;
    assert_eq!(code, ErrorCode::TokenInvalid, "only the development key");
    ws.join_with("demo", "dev", Some(&auth::dev_token("demo", "dev-1")))
        .await
        .unwrap();
    ws.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_token_endpoint_only_in_development_mode() {
    let dev = TestServer::start().await;
    let (status, body) = http_get(dev.http_addr, "/dev/token?room=demo&name=Ann%20B")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = v["token"].as_str().unwrap();
    let verified = Verifier::new(KeySet::new())
        .verify(Some(token), Some("demo"))
        .unwrap();
    assert_eq!(verified.name, "Ann B");
    assert_eq!(verified.identity, v["identity"].as_str().unwrap());
    assert!(verified.identity.starts_with("guest-"), "{body}");
    assert_eq!(verified.grants.to_core(), plaza::sfu::Grants::default());
    let mut ws = RawWs::connect(&dev.ws_url()).await.unwrap();
    ws.join_with("demo", "x", Some(token)).await.unwrap();
    ws.close().await;

    // Chosen identity and grants: a viewer.
    let (status, body) = http_get(
        dev.http_addr,
        "/dev/token?room=demo&identity=viewer-1&grants=subscribe",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let g = Verifier::new(KeySet::new())
        .verify(v["token"].as_str(), None)
        .unwrap();
    assert_eq!(g.identity, "viewer-1");
    let g = g.grants.to_core();
    assert!(g.subscribe && !g.publish_audio && !g.publish_video && !g.publish_data);
    for bad in [
        "/dev/token",
        "/dev/token?room=",
        "/dev/token?room=r&grants=fly",
        "/dev/token?room=r&ttl=0",
    ] {
        let (status, body) = http_get(dev.http_addr, bad).await.unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("error"), "{bad}: {body}");
    }
    dev.shutdown().await;

    let prod = server_with_keys().await;
    let (status, body) = http_get(prod.http_addr, "/dev/token?room=demo&name=a")
        .await
        .unwrap();
    assert_eq!(status, 404, "off with real keys: {body}");
    assert!(!body.contains("token"), "{body}");
    prod.shutdown().await;
}

fn plaza_bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plaza"));
    cmd.env_remove("PLAZA_API_KEY")
        .env_remove("PLAZA_API_SECRET")
        .env_remove("PLAZA_CONFIG")
        .stdin(Stdio::null());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaza_token_output_verifies_and_joins() {
    let out = plaza_bin()
        .args([
            "token",
            "--room",
            "stage",
            "--identity",
            "cli-1",
            "--name",
            "Cli",
        ])
        .args(["--grants", "publish-audio,subscribe", "--ttl", "60"])
        .args(["--api-key", KEY, "--api-secret", SECRET])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let token = token.trim();
    assert_eq!(token.lines().count(), 1, "only the token on stdout");
    let v = Verifier::new(keys())
        .verify(Some(token), Some("stage"))
        .unwrap();
    assert_eq!((v.identity.as_str(), v.name.as_str()), ("cli-1", "Cli"));
    let g = v.grants.to_core();
    assert!(g.publish_audio && !g.publish_video && g.subscribe && !g.publish_data);

    let server = server_with_keys().await;
    let mut ws = RawWs::connect(&server.ws_url()).await.unwrap();
    ws.join_with("stage", "", Some(token)).await.unwrap();
    ws.close().await;
    server.shutdown().await;

    // The development key by default, the key and secret from the environment too.
    let out = plaza_bin()
        .args(["token", "--room", "r", "--identity", "i"])
        .output()
        .unwrap();
    let t = String::from_utf8(out.stdout).unwrap();
    assert!(
        Verifier::new(KeySet::new())
            .verify(Some(t.trim()), Some("r"))
            .is_ok()
    );
    let out = plaza_bin()
        .args(["token", "--room", "r", "--identity", "i"])
        .env("PLAZA_API_KEY", KEY)
        .env("PLAZA_API_SECRET", SECRET)
        .output()
        .unwrap();
    let t = String::from_utf8(out.stdout).unwrap();
    assert!(Verifier::new(keys()).verify(Some(t.trim()), None).is_ok());
    // Bad input: exit status 2, a message, no token.
    let out = plaza_bin()
        .args(["token", "--room", "r", "--identity", "i", "--grants", "fly"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown grant `fly`"));
}

#[test]
fn help_never_shows_secrets() {
    for args in [&["--help"][..], &["token", "--help"]] {
        let out = plaza_bin()
            .args(args)
            .env("PLAZA_API_KEY", KEY)
            .env("PLAZA_API_SECRET", SECRET)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--api-secret"), "{args:?}: {text}");
        assert!(!text.contains(SECRET), "{args:?} shows the secret: {text}");
    }
    // A secret too short is refused with a clear message that does not repeat it.
    let out = plaza_bin()
        .args(["--port", "0", "--udp-port", "0", "--api-key", KEY])
        .env("PLAZA_API_SECRET", "short-secret")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 32"), "{err}");
    assert!(!err.contains("short-secret"), "{err}");
}

/// Starts the server binary with `env` and debug logging, reads its log until `until` appears
/// (bounded), stops it and returns everything it printed.
fn server_log(env: &[(&str, &str)], until: &str) -> String {
    let mut cmd = plaza_bin();
    cmd.args(["--port", "0", "--udp-port", "0", "--workers", "1"])
        .args(["--log-level", "debug", "--log-format", "json"])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let until = until.to_owned();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(&until) {
                break;
            }
        }
        let _ = tx.send(seen);
    });
    let got = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let mut log = got.unwrap_or_else(|_| panic!("the server did not log in 30 s"));
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    log
}

#[test]
fn startup_logs_name_the_mode_and_never_the_secret() {
    let log = server_log(
        &[("PLAZA_API_KEY", KEY), ("PLAZA_API_SECRET", SECRET)],
        "API keys configured",
    );
    assert!(log.contains(KEY), "{log}");
    assert!(!log.contains(SECRET), "{log}");
    assert!(!log.contains("DEVELOPMENT MODE"), "{log}");

    let log = server_log(&[], "DEVELOPMENT MODE");
    assert!(log.contains("\"level\":\"WARN\""), "{log}");
    assert!(!log.contains(auth::DEV_API_SECRET), "{log}");
}

/// The test kit's own joins carry tokens it minted (development key by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_kit_peers_mint_their_tokens() {
    let server = TestServer::start().await;
    let a = support::subscriber(&server, "kit", "a").await;
    assert!(a.participant_id().starts_with("PA_"));
    a.leave().await.unwrap();
    server.shutdown().await;
}
