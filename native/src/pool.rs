//! Backends: per engine thread, one HTTP/2 connection per endpoint, shared by that thread's
//! calls to it, and another (up to `max_connections` per thread) while every connection has as
//! many streams open as the backend allows (its SETTINGS_MAX_CONCURRENT_STREAMS): a backend
//! that limits streams per connection (Go's net/http2: 250, nginx: 128) then takes more calls
//! at once instead of the proxy queueing them (docs/performance.md measures both).
//!
//! A backend's health (its last error and connect backoff) is one per endpoint; its connections
//! are per thread, so a call and its backend stream run on the same thread. An endpoint that
//! leaves every backend set is drained: the pool forgets it, calls that picked it finish on its
//! connections, and they close when the last of them lets go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
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

/// One connection and the streams open on it.
struct Conn {
    id: u64,
    sender: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
}

impl Conn {
    fn has_room(&self) -> bool {
        self.streams.load(Relaxed) < self.sender.current_max_send_streams()
    }

    fn lease(&self) -> Lease {
        self.streams.fetch_add(1, Relaxed);
        Lease {
            sender: self.sender.clone(),
            stream: Stream(Arc::clone(&self.streams)),
        }
    }
}

/// Counts a stream open on a connection for as long as the call holds it.
pub struct Stream(Arc<AtomicUsize>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A connection to send one call's stream on.
pub struct Lease {
    sender: SendRequest<Bytes>,
    stream: Stream,
}

impl Lease {
    /// The connection's handle, and the stream's count to hold until the call is done.
    pub fn into_parts(self) -> (SendRequest<Bytes>, Stream) {
        (self.sender, self.stream)
    }
}

/// One thread's connections to the endpoint.
#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Conn>>,
    /// One connection attempt at a time per thread.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection with a free stream, if one has.
    fn with_room(&self) -> Option<Lease> {
        self.conns().iter().find(|c| c.has_room()).map(Conn::lease)
    }

    /// The connection with the fewest streams, if any (its next call waits for a stream).
    fn least_loaded(&self) -> Option<Lease> {
        self.conns()
            .iter()
            .min_by_key(|c| c.streams.load(Relaxed))
            .map(Conn::lease)
    }
}

pub struct Backend {
    pub hostport: String,
    health: Mutex<Health>,
    slots: Box<[Slot]>,
    /// Connections per thread at most: beyond, calls wait for a stream.
    max_connections: usize,
    drained: AtomicBool,
    next_id: AtomicU64,
}

impl Backend {
    fn new(hostport: String, threads: usize, max_connections: usize) -> Self {
        Backend {
            hostport,
            health: Mutex::new(Health::default()),
            slots: (0..threads).map(|_| Slot::default()).collect(),
            max_connections,
            drained: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any engine thread holds a connection to it.
    pub fn connected(&self) -> bool {
        self.slots.iter().any(|s| !s.conns().is_empty())
    }

    pub fn last_error(&self) -> String {
        self.health().last_error.clone()
    }

    /// A connection of this thread's with a free stream, connecting first when it has none
    /// (or when all are full and fewer than `max_connections` are open). While the backend is
    /// backing off after failed connects, fails at once with the last error, unless a
    /// connection is open: then the call waits for a stream on the least loaded one.
    pub async fn sender(self: &Arc<Self>) -> Result<Lease, String> {
        let index = workers::current();
        let slot = &self.slots[index];
        if let Some(lease) = slot.with_room() {
            return Ok(lease);
        }
        let _one_at_a_time = slot.connecting.lock().await;
        if let Some(lease) = slot.with_room() {
            return Ok(lease);
        }
        let full = slot.conns().len() >= self.max_connections;
        let backing_off = {
            let health = self.health();
            health.failed_at.and_then(|at| {
                let wait = BACKOFF[(health.failures - 1).min(BACKOFF.len() - 1)];
                (at.elapsed() < wait).then(|| health.last_error.clone())
            })
        };
        if full || backing_off.is_some() {
            return match (slot.least_loaded(), backing_off) {
                (Some(lease), _) => Ok(lease),
                (None, why) => Err(why.unwrap_or_default()),
            };
        }
        match self.connect(index).await {
            Ok(conn) => {
                let lease = conn.lease();
                slot.conns().push(conn);
                let mut health = self.health();
                health.failures = 0;
                health.failed_at = None;
                health.last_error.clear();
                Ok(lease)
            }
            Err(e) => {
                let why = {
                    let mut health = self.health();
                    health.failures += 1;
                    health.failed_at = Some(Instant::now());
                    health.last_error = format!("cannot connect: {e}");
                    health.last_error.clone()
                };
                slot.least_loaded().ok_or(why)
            }
        }
    }

    async fn connect(self: &Arc<Self>, index: usize) -> Result<Conn, String> {
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
        let id = self.next_id.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let result = connection.await;
            if let Some(me) = me.upgrade() {
                me.lost(
                    index,
                    id,
                    match result {
                        Ok(()) => "connection closed".to_string(),
                        Err(e) => format!("connection lost: {e}"),
                    },
                );
            }
        });
        Ok(Conn {
            id,
            sender,
            streams: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn lost(&self, index: usize, id: u64, why: String) {
        self.slots[index].conns().retain(|c| c.id != id);
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
    max_connections: usize,
    /// Each engine thread's runtime, in thread order (eager connections are opened on each).
    runtimes: Vec<Handle>,
}

impl Pool {
    /// `max_connections` (≥ 1): per endpoint and thread.
    pub fn new(eager: bool, max_connections: usize, runtimes: Vec<Handle>) -> Self {
        Pool {
            backends: Mutex::new(HashMap::new()),
            eager,
            max_connections,
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
        let backend = Arc::new(Backend::new(
            hostport.to_string(),
            self.runtimes.len(),
            self.max_connections,
        ));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An h2 server on loopback that allows `streams` concurrent streams per connection and
    /// answers each request with headers, holding the stream open.
    async fn server(streams: u32) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut conn = h2::server::Builder::new()
                        .max_concurrent_streams(streams)
                        .handshake::<_, Bytes>(sock)
                        .await
                        .unwrap();
                    let mut held = Vec::new();
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        let response = http::Response::new(());
                        held.push(respond.send_response(response, false).unwrap());
                    }
                });
            }
        });
        addr
    }

    async fn open_stream(backend: &Arc<Backend>) -> (Stream, h2::RecvStream) {
        let (sender, stream) = backend.sender().await.unwrap().into_parts();
        let mut sender = sender.ready().await.unwrap();
        let (response, _) = sender.send_request(http::Request::new(()), false).unwrap();
        (stream, response.await.unwrap().into_body())
    }

    #[test]
    fn a_full_connection_opens_another_up_to_the_bound() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            const MAX: usize = 4;
            let backend = Arc::new(Backend::new(server(2).await, 1, MAX));
            let conns = |b: &Backend| b.slots[0].conns().len();
            let mut held = Vec::new();
            for _ in 0..2 {
                held.push(open_stream(&backend).await);
            }
            assert_eq!(conns(&backend), 1, "two streams fit the first connection");
            held.push(open_stream(&backend).await);
            assert_eq!(conns(&backend), 2, "a third opens a second connection");
            held.clear();
            let streams: Vec<usize> = backend.slots[0]
                .conns()
                .iter()
                .map(|c| c.streams.load(Relaxed))
                .collect();
            assert_eq!(
                streams,
                [0, 0],
                "streams are counted until the call lets go"
            );
            for _ in 0..2 * MAX {
                held.push(open_stream(&backend).await);
            }
            assert_eq!(conns(&backend), MAX, "never more than the bound");
            // Every connection full and the bound reached: the call waits on one of them.
            let _waits = backend.sender().await.unwrap();
        });
    }
}
