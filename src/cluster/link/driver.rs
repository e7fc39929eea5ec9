//! A small tokio driver for a [`Link`]: one task owning the link and a UDP socket. Messages
//! go in through [`LinkHandle::send`], events come out of [`LinkHandle::events`].

// The driver reads the clock once per turn and hands it to the link, as `src/io` does.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // (and an Arc counter shared with the gateway)

use super::codec::LinkMsg;
use super::seal::Key;
use super::{Link, LinkError, LinkEvent, LinkStats, NodeNum};
use crate::sfu::pipe::Lane;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A random 32-byte key and a random salt for a new start of this node.
pub fn random_key_and_salt() -> (Key, u32) {
    use rand::RngCore as _;
    let mut key = [0; 32];
    rand::rng().fill_bytes(&mut key);
    (key, rand::rng().next_u32())
}

// Nearly every command is a message; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    Send {
        peer: NodeNum,
        lane: Lane,
        msg: LinkMsg,
        done: Option<oneshot::Sender<Result<(), LinkError>>>,
    },
    SetPeer {
        id: NodeNum,
        addr: SocketAddr,
        key: Key,
    },
    RemovePeer(NodeNum),
    Stats(oneshot::Sender<LinkStats>),
    SendBatch {
        peer: NodeNum,
        lane: Lane,
        msgs: Vec<LinkMsg>,
        refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    },
}

/// The handle to a running link.
pub struct LinkHandle {
    cmds: mpsc::Sender<Cmd>,
    /// What the link delivers (messages, peers up and down).
    pub events: mpsc::Receiver<LinkEvent>,
    pub local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl LinkHandle {
    /// Queues `msg`; waits for the link's answer (refused: too large, queue full, …).
    pub async fn send(&self, peer: NodeNum, lane: Lane, msg: LinkMsg) -> Result<(), LinkError> {
        self.sender().send(peer, lane, msg).await
    }

    /// Queues `msg` without waiting for the link's answer.
    pub async fn send_nowait(&self, peer: NodeNum, lane: Lane, msg: LinkMsg) {
        let cmd = Cmd::Send {
            peer,
            lane,
            msg,
            done: None,
        };
        let _ = self.cmds.send(cmd).await;
    }

    pub async fn set_peer(&self, id: NodeNum, addr: SocketAddr, key: Key) {
        let _ = self.cmds.send(Cmd::SetPeer { id, addr, key }).await;
    }

    pub async fn remove_peer(&self, id: NodeNum) {
        let _ = self.cmds.send(Cmd::RemovePeer(id)).await;
    }

    pub async fn stats(&self) -> Option<LinkStats> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Stats(tx)).await.ok()?;
        rx.await.ok()
    }

    /// A sender of messages to the link, for another task.
    pub fn sender(&self) -> LinkSender {
        LinkSender {
            cmds: self.cmds.clone(),
        }
    }

    /// What the link delivers, for another task (this handle's `events` then stays empty).
    pub fn take_events(&mut self) -> mpsc::Receiver<LinkEvent> {
        std::mem::replace(&mut self.events, mpsc::channel(1).1)
    }

    /// Stops the task.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Sends messages to a running link (cloneable).
#[derive(Clone)]
pub struct LinkSender {
    cmds: mpsc::Sender<Cmd>,
}

impl LinkSender {
    /// Queues `msg` and waits for the link's answer (refused: unknown peer, too large, queue
    /// full, …).
    pub async fn send(&self, peer: NodeNum, lane: Lane, msg: LinkMsg) -> Result<(), LinkError> {
        let (tx, rx) = oneshot::channel();
        let cmd = Cmd::Send {
            peer,
            lane,
            msg,
            done: Some(tx),
        };
        if self.cmds.send(cmd).await.is_err() {
            return Err(LinkError::UnknownPeer(peer));
        }
        rx.await.unwrap_or(Err(LinkError::UnknownPeer(peer)))
    }

    /// Queues `msgs` (one batch) without waiting, for the link or its answer; `refused` is
    /// told how many the link refused. `Err(msgs)`: the link's command queue is full (the
    /// caller keeps them or drops them; a link that stopped takes and forgets them).
    pub fn try_send_batch(
        &self,
        peer: NodeNum,
        lane: Lane,
        msgs: Vec<LinkMsg>,
        refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<(), Vec<LinkMsg>> {
        let cmd = Cmd::SendBatch {
            peer,
            lane,
            msgs,
            refused,
        };
        match self.cmds.try_send(cmd) {
            Err(mpsc::error::TrySendError::Full(Cmd::SendBatch { msgs, .. })) => Err(msgs),
            _ => Ok(()),
        }
    }
}

/// Runs `link` on `socket` in a new task.
pub fn spawn(link: Link, socket: UdpSocket) -> std::io::Result<LinkHandle> {
    let local_addr = socket.local_addr()?;
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let (ev_tx, ev_rx) = mpsc::channel(4096);
    let task = tokio::spawn(run(link, socket, cmd_rx, ev_tx));
    Ok(LinkHandle {
        cmds: cmd_tx,
        events: ev_rx,
        local_addr,
        task,
    })
}

async fn run(
    mut link: Link,
    socket: UdpSocket,
    mut cmds: mpsc::Receiver<Cmd>,
    events: mpsc::Sender<LinkEvent>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let deadline = link.poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let now = Instant::now();
                if let Ok((n, from)) = r {
                    link.handle_datagram(from, &buf[..n], now);
                    // Then whatever else is already there, without waiting.
                    for _ in 0..64 {
                        match socket.try_recv_from(&mut buf) {
                            Ok((n, from)) => link.handle_datagram(from, &buf[..n], now),
                            Err(_) => break,
                        }
                    }
                }
            }
            c = cmds.recv() => {
                let Some(c) = c else { return };
                // A bounded batch of commands.
                let (mut next, mut n) = (Some(c), 0);
                while let Some(c) = next.take() {
                    apply(&mut link, c);
                    n += 1;
                    if n < 256 {
                        next = cmds.try_recv().ok();
                    }
                }
            }
            () = sleep => link.handle_timeout(Instant::now()),
        }
        let now = Instant::now();
        link.handle_timeout(now);
        while let Some((addr, d)) = link.poll_transmit(now) {
            // A full socket buffer loses the datagram: the control lane sends it again.
            let _ = socket.send_to(&d, addr).await;
        }
        while let Some(ev) = link.poll_event() {
            match &ev {
                LinkEvent::PeerUp(p) => tracing::info!(peer = p, "node link: peer up"),
                LinkEvent::PeerDown(p) => tracing::warn!(peer = p, "node link: peer down"),
                LinkEvent::Message { .. } => {}
            }
            // Bounded: an owner that stops reading stalls the link (it stops reading its
            // socket; the peer's control lane sends again).
            if events.send(ev).await.is_err() {
                return;
            }
        }
    }
}

fn apply(link: &mut Link, c: Cmd) {
    match c {
        Cmd::Send {
            peer,
            lane,
            msg,
            done,
        } => {
            let r = link.send(peer, lane, &msg);
            if let Some(done) = done {
                let _ = done.send(r);
            }
        }
        Cmd::SendBatch {
            peer,
            lane,
            msgs,
            refused,
        } => {
            let n = msgs
                .iter()
                .filter(|m| link.send(peer, lane, m).is_err())
                .count();
            if n > 0 {
                refused.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                tracing::trace!(peer, n, "node link: messages refused");
            }
        }
        Cmd::SetPeer { id, addr, key } => link.set_peer(id, addr, key),
        Cmd::RemovePeer(id) => link.remove_peer(id),
        Cmd::Stats(tx) => {
            let _ = tx.send(link.stats());
        }
    }
}
