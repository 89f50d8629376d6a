//! Idle router connections, kept by each worker thread for itself.
//!
//! Pingora's pool is shared by every thread: giving a connection back
//! allocates a lock, an LRU node and a notifier and spawns a task to watch
//! it while idle, and taking it back locks it and asks the kernel for the
//! socket's peer address (`getpeername`). A worker here only ever uses its
//! own connections, so a plain list per thread does it with no lock, no
//! task and no system call (what it buys: bench/RESULTS.md).
//!
//! A connection is checked as it goes in and as it comes out, as Pingora
//! checks it: a read that does not wait must find nothing. The socket's
//! readiness is the event loop's, so this costs no system call unless the
//! router wrote or closed meanwhile; bytes from the router on an idle
//! connection would otherwise be read as the next request's answer.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::FutureExt;
use pingora::connectors::TransportConnector;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::Result;
use thread_local::ThreadLocal;
use tokio::io::AsyncReadExt;

/// Connections to the router: made by Pingora's transport connector (TCP,
/// or TLS with the peer's certificates), kept idle per worker thread.
pub struct RouterPool {
    connector: TransportConnector,
    idle: ThreadLocal<RefCell<VecDeque<Idle>>>,
    idle_timeout: Duration,
    max_idle: usize,
}

struct Idle {
    addr: SocketAddr,
    since: Instant,
    stream: Stream,
}

impl RouterPool {
    /// Each worker keeps at most `max_idle` idle connections (the oldest
    /// goes first), none idle for longer than `idle_timeout`.
    pub fn new(idle_timeout: Duration, max_idle: usize) -> Self {
        RouterPool {
            connector: TransportConnector::new(None),
            idle: ThreadLocal::new(),
            idle_timeout,
            max_idle,
        }
    }

    /// A connection to `peer`, and whether it was idle in this thread's
    /// pool (a request that fails on one before any answer may go again).
    pub async fn get(&self, peer: &HttpPeer) -> Result<(Stream, bool)> {
        if let Some(stream) = self.take(peer.address()) {
            return Ok((stream, true));
        }
        // Boxed: the connector's state (a TLS handshake's, too) would
        // otherwise sit inside every request's future, pooled or not.
        Ok((Box::pin(self.connector.new_stream(peer)).await?, false))
    }

    fn take(&self, addr: &SocketAddr) -> Option<Stream> {
        let mut idle = self.idle.get_or_default().borrow_mut();
        let now = Instant::now();
        // Oldest first: what has idled too long is at the front.
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
        loop {
            let at = idle.iter().rposition(|c| &c.addr == addr)?;
            let mut conn = idle.remove(at)?;
            if quiet(&mut conn.stream) {
                return Some(conn.stream);
            }
        }
    }

    /// Keeps `stream`, whose exchange ended cleanly, for the next request
    /// to `peer` on this thread.
    pub fn put(&self, peer: &HttpPeer, mut stream: Stream) {
        if self.max_idle == 0 || !quiet(&mut stream) {
            return;
        }
        let mut idle = self.idle.get_or_default().borrow_mut();
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back(Idle {
            addr: peer.address().clone(),
            since: Instant::now(),
            stream,
        });
    }
}

/// True when the router has neither written nor closed: a read that does
/// not wait finds nothing (and only asks the kernel when the event loop saw
/// the socket become readable).
fn quiet(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    // `unconstrained`: tokio's budget could make a ready read look pending.
    match tokio::task::unconstrained(stream.read(&mut byte)).now_or_never() {
        None => true,
        Some(Ok(0)) => false,
        Some(Ok(_)) => {
            tracing::warn!("the router sent data on an idle connection; closing it");
            false
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "idle router connection broken");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request's future holds this one and is moved whole, so a new
    /// connection's state (Pingora's connector, a TLS handshake's) stays
    /// boxed out of it. The size is the compiler's, not a timing.
    #[test]
    fn taking_a_connection_keeps_the_connectors_state_out_of_the_requests_future() {
        let pool = RouterPool::new(Duration::from_secs(1), 1);
        let peer = HttpPeer::new("127.0.0.1:9", false, String::new());
        let get = pool.get(&peer);
        assert!(
            std::mem::size_of_val(&get) <= 256,
            "get: {} bytes",
            std::mem::size_of_val(&get)
        );
    }
}
