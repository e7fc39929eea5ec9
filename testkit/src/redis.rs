//! A real `redis-server` for the cluster tests: on a free loopback port, without persistence
//! (`--save '' --appendonly no`), answering PING before [`RedisServer::start`] returns, killed
//! on drop. `scripts/test.sh` installs Debian's `redis-server` when it is missing.

// Test tooling: waits with a deadline read from the clock.
#![allow(clippy::disallowed_methods)]

use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started `redis-server` may take to answer PING.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    /// On a free loopback port.
    pub fn start() -> Result<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("a free loopback port")?
            .port();
        RedisServer::start_on(port)
    }

    /// On `port` (a restart on the port of a killed one).
    pub fn start_on(port: u16) -> Result<RedisServer> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (scripts/test.sh installs Debian's redis-server)")?;
        let mut server = RedisServer {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if server.ping() {
                return Ok(server);
            }
            if let Some(child) = server.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("redis-server on port {port} exited: {status}");
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {port} did not answer PING within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Whether it answers PING (within 500 ms).
    pub fn ping(&self) -> bool {
        let t = Duration::from_millis(500);
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr(), t) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(t));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    /// Kills it (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
