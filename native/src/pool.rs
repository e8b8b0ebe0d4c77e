//! Backends: per engine thread, one HTTP/2 connection per endpoint, shared by that thread's
//! calls to it.
//!
//! A backend's health (its last error and connect backoff) is one per endpoint; its connections
//! are one per thread, so a call and its backend stream run on the same thread. An endpoint that
//! leaves every backend set is drained: the pool forgets it, calls that picked it finish on its
//! connections, and they close when the last of them lets go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tokio::runtime::Handle;

use crate::proxy::{CONNECTION_WINDOW, STREAM_WINDOW};
use crate::workers;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF: [Duration; 5] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

#[derive(Default)]
struct Health {
    last_error: String,
    failures: usize,
    failed_at: Option<Instant>,
}

/// One thread's connection to the endpoint.
#[derive(Default)]
struct Slot {
    sender: Mutex<Option<SendRequest<Bytes>>>,
    /// One connection attempt at a time per thread.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn sender(&self) -> std::sync::MutexGuard<'_, Option<SendRequest<Bytes>>> {
        self.sender.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Backend {
    pub hostport: String,
    health: Mutex<Health>,
    slots: Box<[Slot]>,
    drained: AtomicBool,
}

impl Backend {
    fn new(hostport: String, threads: usize) -> Self {
        Backend {
            hostport,
            health: Mutex::new(Health::default()),
            slots: (0..threads).map(|_| Slot::default()).collect(),
            drained: AtomicBool::new(false),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any engine thread holds a connection to it.
    pub fn connected(&self) -> bool {
        self.slots.iter().any(|s| s.sender().is_some())
    }

    pub fn last_error(&self) -> String {
        self.health().last_error.clone()
    }

    /// This thread's handle on the backend, connecting first if it has none. While the backend
    /// is backing off after failed connects, fails at once with the last error.
    pub async fn sender(self: &Arc<Self>) -> Result<SendRequest<Bytes>, String> {
        let index = workers::current();
        let slot = &self.slots[index];
        if let Some(s) = &*slot.sender() {
            return Ok(s.clone());
        }
        let _one_at_a_time = slot.connecting.lock().await;
        if let Some(s) = &*slot.sender() {
            return Ok(s.clone());
        }
        {
            let health = self.health();
            if let Some(at) = health.failed_at {
                let wait = BACKOFF[(health.failures - 1).min(BACKOFF.len() - 1)];
                if at.elapsed() < wait {
                    return Err(health.last_error.clone());
                }
            }
        }
        match self.connect(index).await {
            Ok(sender) => {
                *slot.sender() = Some(sender.clone());
                let mut health = self.health();
                health.failures = 0;
                health.failed_at = None;
                health.last_error.clear();
                Ok(sender)
            }
            Err(e) => {
                let mut health = self.health();
                health.failures += 1;
                health.failed_at = Some(Instant::now());
                health.last_error = format!("cannot connect: {e}");
                Err(health.last_error.clone())
            }
        }
    }

    async fn connect(self: &Arc<Self>, index: usize) -> Result<SendRequest<Bytes>, String> {
        let tcp =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.hostport)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(io_message(&e)),
                Err(_) => return Err(format!("timed out after {}s", CONNECT_TIMEOUT.as_secs())),
            };
        tcp.set_nodelay(true).map_err(|e| io_message(&e))?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
        // Weak: the connection must not keep its backend alive, or a drained backend's
        // connection would never close (see `drain`). Spawned on this thread's runtime.
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let result = connection.await;
            if let Some(me) = me.upgrade() {
                me.lost(
                    index,
                    match result {
                        Ok(()) => "connection closed".to_string(),
                        Err(e) => format!("connection lost: {e}"),
                    },
                );
            }
        });
        Ok(sender)
    }

    fn lost(&self, index: usize, why: String) {
        *self.slots[index].sender() = None;
        if !self.drained.load(Relaxed) {
            self.health().last_error = why;
        }
    }

    /// Out of every set. Calls that picked it (even a moment ago, on another thread) still use
    /// its connections; once the last route and call holding the backend let go, the backend
    /// is dropped with its connection handles, and h2 closes each connection after its streams.
    fn drain(&self) {
        self.drained.store(true, Relaxed);
    }
}

/// "Connection refused", not "Connection refused (os error 111)".
fn io_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Endpoints by `host:port`, counted by the routes that use them.
pub struct Pool {
    backends: Mutex<HashMap<String, (Arc<Backend>, usize)>>,
    eager: bool,
    /// Each engine thread's runtime, in thread order (eager connections are opened on each).
    runtimes: Vec<Handle>,
}

impl Pool {
    pub fn new(eager: bool, runtimes: Vec<Handle>) -> Self {
        Pool {
            backends: Mutex::new(HashMap::new()),
            eager,
            runtimes,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Backend>, usize)>> {
        self.backends.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn acquire(&self, hostport: &str) -> Arc<Backend> {
        let mut map = self.map();
        if let Some((backend, refs)) = map.get_mut(hostport) {
            *refs += 1;
            return Arc::clone(backend);
        }
        let backend = Arc::new(Backend::new(hostport.to_string(), self.runtimes.len()));
        map.insert(hostport.to_string(), (Arc::clone(&backend), 1));
        if self.eager {
            for runtime in &self.runtimes {
                let warm = Arc::clone(&backend);
                runtime.spawn(async move {
                    let _ = warm.sender().await;
                });
            }
        }
        backend
    }

    pub fn release(&self, hostport: &str) {
        let mut map = self.map();
        if let Some((backend, refs)) = map.get_mut(hostport) {
            *refs -= 1;
            if *refs == 0 {
                backend.drain();
                map.remove(hostport);
            }
        }
    }

    /// (connected, last error) of an endpoint in use, if it is.
    pub fn status(&self, hostport: &str) -> Option<(bool, String)> {
        self.map()
            .get(hostport)
            .map(|(b, _)| (b.connected(), b.last_error()))
    }

    pub fn drain_all(&self) {
        let mut map = self.map();
        for (b, _) in map.values() {
            b.drain();
        }
        map.clear();
    }
}
