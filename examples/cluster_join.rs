//! Join time in a cluster: through the room's node, through another node (a `redirect`
//! followed), through another node that extends the room (`--cluster-span-above`: no redirect,
//! the room opened there and greeted over the node link), and on a node without Redis, with the
//! release binary and a real `redis-server`.
//!
//! ```sh
//! cargo build --release --bin plaza --example cluster_join
//! ./target/release/examples/cluster_join [JOINS]   # default 200 of each kind, interleaved
//! ```
//!
//! A join is timed from the WebSocket connect to `joined` (the participant exists on the
//! room's node and its subscriber offer follows), redirects included; each participant then
//! sends `leave`. One participant holds the room on node A the whole time; another room, `wide`,
//! has three participants on A, which makes A extend it to every node (the nodes run with
//! `--cluster-span-above 3`), so joins of `wide` through B are served by B.

// A measuring tool: it reads the clock and prints its results.
#![allow(clippy::disallowed_methods, clippy::print_stdout)]

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use plaza::signal::{ClientMessage, ServerMessage};
use plaza_testkit::redis::RedisServer;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Node(Child, u16);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start(redis: Option<&str>, id: &str) -> Result<Node> {
    let bin = std::env::var("PLAZA_BIN").unwrap_or_else(|_| "target/release/plaza".to_owned());
    let port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--port",
        &port.to_string(),
        "--udp-port",
        "0",
        "--tcp-port",
        "off",
    ])
    .args(["--log-level", "warn", "--max-joins-per-ip", "0"])
    .env_remove("PLAZA_API_KEY")
    .env_remove("PLAZA_API_SECRET")
    .env_remove("PLAZA_CONFIG")
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    if let Some(url) = redis {
        cmd.args(["--redis", url, "--node-id", id, "--cluster-span-above", "3"]);
    }
    let child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
    Ok(Node(child, port))
}

async fn wait_up(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok((200, _)) =
            plaza_testkit::support::http_get(([127, 0, 0, 1], port).into(), "/healthz").await
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("node on port {port} did not come up")
}

/// Connects to `url`, joins `room` as `name` (following redirects), returns the time to
/// `joined`, the redirects followed, and the socket.
async fn join(url: &str, room: &str, name: &str) -> Result<(Duration, u32, Ws)> {
    let start = Instant::now();
    let token = plaza_testkit::token::participant(room, name);
    let mut url = url.to_owned();
    let mut redirects = 0;
    loop {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        let msg = ClientMessage::Join {
            room: room.to_owned(),
            name: name.to_owned(),
            token: Some(token.clone()),
            protocol: Some(1),
            auto_subscribe: Some(false),
            timeline_events: None,
        };
        ws.send(Message::Text(serde_json::to_string(&msg)?.into()))
            .await?;
        loop {
            let Some(frame) = ws.next().await else {
                bail!("closed before joined");
            };
            let Message::Text(text) = frame? else {
                continue;
            };
            match serde_json::from_str::<ServerMessage>(&text)? {
                ServerMessage::Joined { .. } => return Ok((start.elapsed(), redirects, ws)),
                ServerMessage::Redirect { address, .. } => {
                    url = plaza::cluster::placement::redirect_url(&url, &address)
                        .context("redirect URL")?;
                    redirects += 1;
                    if redirects > 3 {
                        bail!("too many redirects");
                    }
                    break;
                }
                ServerMessage::Error { message, .. } => bail!("join refused: {message}"),
                _ => {}
            }
        }
    }
}

async fn leave(mut ws: Ws) {
    let _ = ws
        .send(Message::Text(r#"{"type":"leave"}"#.to_owned().into()))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let q = |p: f64| ms(v[((v.len() - 1) as f64 * p).round() as usize]);
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        v.len(),
        q(0.5),
        q(0.99),
        ms(v[v.len() - 1]),
        mean
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let joins: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200);
    let redis = RedisServer::start()?;
    let a = start(Some(&redis.url()), "ND_a")?;
    let b = start(Some(&redis.url()), "ND_b")?;
    let solo = start(None, "")?;
    for n in [&a, &b, &solo] {
        wait_up(n.1).await?;
    }
    let (ua, ub, us) = (
        format!("ws://127.0.0.1:{}/rtc", a.1),
        format!("ws://127.0.0.1:{}/rtc", b.1),
        format!("ws://127.0.0.1:{}/rtc", solo.1),
    );
    // B must be listed before it can be told where the room is; the room then lives on A.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, r, holder) = join(&ua, "bench", "holder").await?;
    assert_eq!(r, 0, "the room starts on A");
    let (_, _, solo_holder) = join(&us, "bench", "holder").await?;
    let mut wide = Vec::new();
    for i in 0..3 {
        let (_, r, ws) = join(&ua, "wide", &format!("w{i}")).await?;
        assert_eq!(r, 0, "the wide room starts on A");
        wide.push(ws);
    }

    let (mut home, mut other, mut single, mut extended) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..joins {
        let (t, r, ws) = join(&ua, "bench", &format!("h{i}")).await?;
        assert_eq!(r, 0);
        home.push(t);
        leave(ws).await;
        let (t, r, ws) = join(&ub, "bench", &format!("o{i}")).await?;
        assert_eq!(r, 1, "joined through B: one redirect");
        other.push(t);
        leave(ws).await;
        let (t, _, ws) = join(&us, "bench", &format!("s{i}")).await?;
        single.push(t);
        leave(ws).await;
        let (t, r, ws) = join(&ub, "wide", &format!("x{i}")).await?;
        assert_eq!(r, 0, "the wide room is extended to B: no redirect");
        extended.push(t);
        leave(ws).await;
    }
    println!("| join | joins | p50 ms | p99 ms | max ms | mean ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    summary("through the room's node (A)", home);
    summary("through the other node (B → redirect → A)", other);
    summary(
        "through the other node, the room extended there (B)",
        extended,
    );
    summary("one node, no Redis", single);
    leave(holder).await;
    for ws in wide {
        leave(ws).await;
    }
    leave(solo_holder).await;
    Ok(())
}
