//! Backends: per engine thread, one HTTP/2 connection per endpoint, shared by that thread's
//! calls to it, and another (up to `max_connections` per thread) while every connection has as
//! many streams open as the backend allows (its SETTINGS_MAX_CONCURRENT_STREAMS): a backend
//! that limits streams per connection (Go's net/http2: 250, nginx: 128) then takes more calls
//! at once instead of the proxy queueing them (docs/performance.md measures both).
//!
//! Connection lifecycle (docs/failover.md):
//! - a connection is up once TCP connects, the HTTP/2 handshake is sent and the backend answers
//!   a PING, within the handshake timeout: a stopped process still completes TCP handshakes in
//!   the kernel, only an answer proves it serves;
//! - a connection that gets GOAWAY is draining: no new stream goes on it, its streams finish;
//! - while calls are open on a connection and the backend has sent nothing for the keepalive
//!   time, it is PINGed; no answer within the keepalive timeout and the connection is closed
//!   and the endpoint is down. At most two PINGs per silence (then one per five minutes), so
//!   that grpc-go's and grpc-java's default enforcement (a PING more often than every five
//!   minutes is a strike unless data was sent, the third strike is a GOAWAY) never fires; if
//!   a backend still answers `too_many_pings`, its keepalive time doubles;
//! - an endpoint whose connect fails is down (`connect_failing`): strategies skip it and one
//!   task reconnects with exponential backoff and jitter until it answers again.
//!
//! Health (down, last error) is one per endpoint; connections are per thread, so a call and
//! its backend stream run on the same thread. An endpoint that leaves every backend set is
//! drained: the pool forgets it, calls that picked it finish on its connections, and they
//! close when the last of them lets go.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong, Reason};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use crate::events::{unix_now, Events};
use crate::proxy::{CONNECTION_WINDOW, STREAM_WINDOW};
use crate::tls::ClientTls;
use crate::workers;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect backoff, as gRPC's connection backoff but starting sooner and capped lower (a
/// pod that restarts is back within seconds): base × 1.6ⁿ, ±20%, at most BACKOFF_MAX.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// PINGs without the backend sending anything in between, before waiting SLOW_PING.
const SILENT_PINGS: u32 = 2;
/// grpc-go's and grpc-java's default minimum time between PINGs.
const SLOW_PING: Duration = Duration::from_secs(300);

/// How backend connections are opened and watched (all from ProxySettings).
#[derive(Clone, Copy)]
pub struct Tuning {
    pub handshake_timeout: Duration,
    /// None: no keepalive PINGs.
    pub keepalive_time: Option<Duration>,
    pub keepalive_timeout: Duration,
}

/// Opens an HTTP/2 connection to `hostport`: TCP, TLS when `tls` is given, the handshake, and
/// one PING answered, TLS, handshake and PING within `handshake`. The connection runs on this
/// thread's runtime until the returned sender and every stream let go (or it is aborted);
/// `on_close` gets its end.
pub async fn dial(
    hostport: &str,
    handshake: Duration,
    tls: Option<&ClientTls>,
    on_close: impl FnOnce(Result<(), h2::Error>) + Send + 'static,
) -> Result<(SendRequest<Bytes>, PingPong, AbortHandle), String> {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(hostport)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(io_message(&e)),
        Err(_) => {
            return Err(format!(
                "TCP connect timed out after {}s",
                CONNECT_TIMEOUT.as_secs()
            ))
        }
    };
    tcp.set_nodelay(true).map_err(|e| io_message(&e))?;
    let deadline = tokio::time::Instant::now() + handshake;
    match tls {
        None => speak_h2(tcp, deadline, handshake, on_close).await,
        Some(tls) => {
            let connecting = tls.connector.connect(tls.server_name.clone(), tcp);
            match tokio::time::timeout_at(deadline, connecting).await {
                Ok(Ok(stream)) => speak_h2(stream, deadline, handshake, on_close).await,
                Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                Err(_) => Err(format!(
                    "TLS handshake: no answer within {}s",
                    handshake.as_secs_f64()
                )),
            }
        }
    }
}

/// The HTTP/2 handshake and a PING answered on `io`, by `deadline`.
async fn speak_h2<T>(
    io: T,
    deadline: tokio::time::Instant,
    handshake: Duration,
    on_close: impl FnOnce(Result<(), h2::Error>) + Send + 'static,
) -> Result<(SendRequest<Bytes>, PingPong, AbortHandle), String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let silent = || {
        format!(
            "HTTP/2 handshake: no answer within {}s (a process that is stopped or overloaded \
             still accepts TCP connections)",
            handshake.as_secs_f64()
        )
    };
    let handshaking = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .enable_push(false)
        .handshake::<_, Bytes>(io);
    let (sender, mut connection) = match tokio::time::timeout_at(deadline, handshaking).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(format!("HTTP/2 handshake failed: {e}")),
        Err(_) => return Err(silent()),
    };
    let mut ping_pong = connection.ping_pong().expect("taken once");
    let driver = tokio::spawn(async move { on_close(connection.await) }).abort_handle();
    match tokio::time::timeout_at(deadline, ping_pong.ping(Ping::opaque())).await {
        Ok(Ok(_)) => Ok((sender, ping_pong, driver)),
        Ok(Err(e)) => {
            driver.abort();
            Err(format!("HTTP/2 handshake failed: {e}"))
        }
        Err(_) => {
            driver.abort();
            Err(silent())
        }
    }
}

/// The shared state of one backend connection.
pub struct ConnState {
    /// Streams admitted (sent or about to be).
    streams: AtomicUsize,
    /// Calls waiting for a stream on it (all connections full), and their wake-up.
    waiting: AtomicUsize,
    freed: tokio::sync::Notify,
    /// Bumped by each frame the backend sends on a stream (keepalive sees silence by it).
    progress: AtomicU64,
    draining: AtomicBool,
}

/// One connection and the streams open on it.
struct Conn {
    id: u64,
    sender: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.state.draining.load(Relaxed)
    }

    fn has_room(&self) -> bool {
        self.usable() && self.state.streams.load(Relaxed) < self.sender.current_max_send_streams()
    }

    /// A stream admitted now (whether or not the connection has room).
    fn lease(&self) -> Lease {
        self.state.streams.fetch_add(1, Relaxed);
        Lease {
            sender: self.sender.clone(),
            state: Arc::clone(&self.state),
            stream: Some(Stream(Arc::clone(&self.state))),
        }
    }

    /// A stream to admit once the connection has room (`Lease::admitted`).
    fn queue(&self) -> Lease {
        Lease {
            sender: self.sender.clone(),
            state: Arc::clone(&self.state),
            stream: None,
        }
    }
}

/// Counts a stream open on a connection for as long as the call holds it.
pub struct Stream(Arc<ConnState>);

impl Stream {
    /// The backend sent something on this connection.
    #[inline]
    pub fn progressed(&self) {
        self.0.progress.fetch_add(1, Relaxed);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Relaxed);
        if self.0.waiting.load(Relaxed) > 0 {
            self.0.freed.notify_waiters();
        }
    }
}

/// A connection to send one call's stream on: admitted at once when it had room, else once
/// one of its streams ends.
pub struct Lease {
    sender: SendRequest<Bytes>,
    state: Arc<ConnState>,
    stream: Option<Stream>,
}

impl Lease {
    /// Waits until the connection has room for this call's stream (at once, unless every
    /// connection to the endpoint was full), at most until `deadline`; false: still no room.
    pub async fn admitted(&mut self, deadline: tokio::time::Instant) -> bool {
        if self.stream.is_some() {
            return true;
        }
        let state = &self.state;
        state.waiting.fetch_add(1, Relaxed);
        let admitted = loop {
            let mut freed = pin!(state.freed.notified());
            freed.as_mut().enable();
            let max = self.sender.current_max_send_streams();
            let open = state.streams.load(Relaxed);
            if open < max
                && state
                    .streams
                    .compare_exchange(open, open + 1, Relaxed, Relaxed)
                    .is_ok()
            {
                break true;
            }
            if state.draining.load(Relaxed)
                || tokio::time::timeout_at(deadline, freed).await.is_err()
            {
                break false;
            }
        };
        state.waiting.fetch_sub(1, Relaxed);
        if admitted {
            self.stream = Some(Stream(Arc::clone(&self.state)));
        }
        admitted
    }

    /// The connection's handle, and the stream's count to hold until the call is done.
    /// Only once admitted.
    pub fn into_parts(self) -> (SendRequest<Bytes>, Stream) {
        (self.sender, self.stream.expect("admitted"))
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

    /// A connection with a free stream, if one has (forgetting draining ones on the way).
    fn with_room(&self) -> Option<Lease> {
        let mut conns = self.conns();
        if conns.iter().any(|c| !c.usable()) {
            conns.retain(Conn::usable);
        }
        conns.iter().find(|c| c.has_room()).map(Conn::lease)
    }

    /// The connection with the fewest streams, if any: its next call waits for a stream.
    fn least_loaded(&self) -> Option<Lease> {
        self.conns()
            .iter()
            .filter(|c| c.usable())
            .min_by_key(|c| {
                let s = &c.state;
                s.streams.load(Relaxed) + s.waiting.load(Relaxed)
            })
            .map(Conn::queue)
    }
}

#[derive(Default)]
struct Health {
    last_error: String,
    failures: u32,
    since: f64,
}

pub struct Backend {
    pub hostport: String,
    /// Its key in the pool: HOST:PORT, and the TLS configuration when there is one.
    pub key: String,
    pub tls: Option<Arc<ClientTls>>,
    /// Its connects fail: strategies skip it; `reconnecting` says a task is trying again.
    down: AtomicBool,
    reconnecting: AtomicBool,
    health: Mutex<Health>,
    slots: Box<[Slot]>,
    /// Connections per thread at most: beyond, calls wait for a stream.
    max_connections: usize,
    drained: AtomicBool,
    next_id: AtomicU64,
    tuning: Tuning,
    /// The keepalive time in ms, doubled by each `too_many_pings`.
    keepalive_ms: AtomicU64,
    events: Arc<Events>,
}

impl Backend {
    fn new(
        hostport: String,
        tls: Option<Arc<ClientTls>>,
        threads: usize,
        max_connections: usize,
        tuning: Tuning,
        events: Arc<Events>,
    ) -> Self {
        Backend {
            key: pool_key(&hostport, tls.as_deref()),
            tls,
            hostport,
            down: AtomicBool::new(false),
            reconnecting: AtomicBool::new(false),
            health: Mutex::new(Health::default()),
            slots: (0..threads).map(|_| Slot::default()).collect(),
            max_connections,
            drained: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            tuning,
            keepalive_ms: AtomicU64::new(tuning.keepalive_time.map_or(0, |t| t.as_millis() as u64)),
            events,
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its connects fail lately (strategies skip it).
    #[inline]
    pub fn is_down(&self) -> bool {
        self.down.load(Relaxed)
    }

    /// Whether any engine thread holds a connection to it that takes new streams.
    pub fn connected(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.conns().iter().any(Conn::usable))
    }

    /// (connected, last error, down, down since)
    pub fn status(&self) -> (bool, String, bool, f64) {
        let h = self.health();
        (
            self.connected(),
            h.last_error.clone(),
            self.is_down(),
            h.since,
        )
    }

    /// A connection of this thread's with a free stream, connecting first when it has none
    /// (or when all are full and fewer than `max_connections` are open). While the endpoint
    /// is down, fails at once with its last error (a task is reconnecting meanwhile).
    pub async fn sender(self: &Arc<Self>) -> Result<Lease, String> {
        let index = workers::current();
        let slot = &self.slots[index];
        if let Some(lease) = slot.with_room() {
            return Ok(lease);
        }
        if self.is_down() {
            return Err(self.health().last_error.clone());
        }
        let _one_at_a_time = slot.connecting.lock().await;
        if let Some(lease) = slot.with_room() {
            return Ok(lease);
        }
        if self.is_down() {
            return Err(self.health().last_error.clone());
        }
        if slot.conns().len() >= self.max_connections {
            if let Some(lease) = slot.least_loaded() {
                return Ok(lease);
            }
        }
        match self.connect(index).await {
            Ok(conn) => {
                let lease = conn.lease();
                slot.conns().push(conn);
                self.up();
                Ok(lease)
            }
            Err(e) => {
                let why = format!("cannot connect: {e}");
                self.mark_down(index, why.clone());
                slot.least_loaded().ok_or(why)
            }
        }
    }

    fn up(&self) {
        let mut h = self.health();
        h.failures = 0;
        if self.down.swap(false, Relaxed) {
            h.since = unix_now();
            self.events
                .push("", &self.hostport, "healthy", "connected again".into());
        }
        h.last_error.clear();
    }

    /// The endpoint cannot take calls: skip it, and reconnect in the background.
    fn mark_down(self: &Arc<Self>, index: usize, why: String) {
        {
            let mut h = self.health();
            h.failures = h.failures.saturating_add(1);
            h.last_error = why.clone();
            if !self.down.swap(true, Relaxed) {
                h.since = unix_now();
                self.events.push("", &self.hostport, "connect_failing", why);
            }
        }
        if !self.reconnecting.swap(true, Relaxed) {
            tokio::spawn(reconnect(Arc::downgrade(self), index));
        }
    }

    async fn connect(self: &Arc<Self>, index: usize) -> Result<Conn, String> {
        // Weak: the connection must not keep its backend alive, or a drained backend's
        // connection would never close (see `drain`). Runs on this thread's runtime.
        let me = Arc::downgrade(self);
        let id = self.next_id.fetch_add(1, Relaxed);
        let on_close = move |result: Result<(), h2::Error>| {
            if let Some(me) = me.upgrade() {
                me.lost(index, id, result);
            }
        };
        let (sender, ping_pong, driver) = dial(
            &self.hostport,
            self.tuning.handshake_timeout,
            self.tls.as_deref(),
            on_close,
        )
        .await?;
        let state = Arc::new(ConnState {
            streams: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
            progress: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        });
        if self.tuning.keepalive_time.is_some() {
            tokio::spawn(keepalive(
                Arc::downgrade(self),
                Arc::downgrade(&state),
                ping_pong,
                driver,
                index,
                id,
            ));
        }
        Ok(Conn { id, sender, state })
    }

    /// A connection ended (the backend closed it, or it broke).
    fn lost(&self, index: usize, id: u64, result: Result<(), h2::Error>) {
        self.slots[index].conns().retain(|c| c.id != id);
        if self.drained.load(Relaxed) {
            return;
        }
        if let Err(e) = result {
            self.observe(&e);
            let why = format!("connection lost: {e}");
            self.events
                .push("", &self.hostport, "connection_lost", why.clone());
            self.health().last_error = why;
        }
    }

    /// A connection refused a new stream with `e` (GOAWAY, or it broke): it takes no more.
    pub fn draining(&self, stream: &Stream, e: &h2::Error) {
        if !stream.0.draining.swap(true, Relaxed) {
            self.observe(e);
            self.events
                .push("", &self.hostport, "draining", format!("connection: {e}"));
        }
    }

    /// Honours `too_many_pings`: the backend wants fewer PINGs, so the keepalive time doubles.
    fn observe(&self, e: &h2::Error) {
        if e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::ENHANCE_YOUR_CALM) {
            let ms = self.keepalive_ms.load(Relaxed);
            if ms > 0 {
                self.keepalive_ms.store(ms.saturating_mul(2), Relaxed);
                self.events.push(
                    "",
                    &self.hostport,
                    "draining",
                    format!(
                        "backend sent GOAWAY ENHANCE_YOUR_CALM (too_many_pings): keepalive \
                         time now {}s",
                        ms as f64 * 2.0 / 1000.0
                    ),
                );
            }
        }
    }

    /// A backend with no pool around it, to test what builds on backends.
    #[cfg(test)]
    pub fn detached(hostport: &str) -> Arc<Self> {
        let tuning = Tuning {
            handshake_timeout: Duration::from_secs(1),
            keepalive_time: None,
            keepalive_timeout: Duration::from_secs(1),
        };
        Arc::new(Backend::new(
            hostport.into(),
            None,
            1,
            1,
            tuning,
            Arc::default(),
        ))
    }

    #[cfg(test)]
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Relaxed);
    }

    /// Out of every set. Calls that picked it (even a moment ago, on another thread) still use
    /// its connections; once the last route and call holding the backend let go, the backend
    /// is dropped with its connection handles, and h2 closes each connection after its streams.
    fn drain(&self) {
        self.drained.store(true, Relaxed);
    }
}

/// Reconnects a down endpoint, with exponential backoff and jitter, until it answers (the
/// connection then serves thread `index`) or it leaves every set.
async fn reconnect(backend: Weak<Backend>, index: usize) {
    loop {
        let failures = match backend.upgrade() {
            Some(b) => b.health().failures,
            None => return,
        };
        let delay = BACKOFF_BASE
            .mul_f64(1.6f64.powi(failures.saturating_sub(1).min(20) as i32))
            .min(BACKOFF_MAX)
            .mul_f64(0.8 + 0.4 * fastrand::f64());
        tokio::time::sleep(delay).await;
        let Some(b) = backend.upgrade() else { return };
        if b.drained.load(Relaxed) {
            return;
        }
        match b.connect(index).await {
            Ok(conn) => {
                b.slots[index].conns().push(conn);
                b.reconnecting.store(false, Relaxed);
                b.up();
                return;
            }
            // Still down, and this task is the one reconnecting: only the failure is recorded.
            Err(e) => b.mark_down(index, format!("cannot connect: {e}")),
        }
    }
}

/// PINGs a connection that has calls open and from which nothing came for the keepalive time;
/// closes it and marks the endpoint down when no answer comes within the keepalive timeout.
async fn keepalive(
    backend: Weak<Backend>,
    conn: Weak<ConnState>,
    mut ping_pong: PingPong,
    driver: AbortHandle,
    index: usize,
    id: u64,
) {
    let mut seen = 0u64;
    let mut quiet_since = Instant::now();
    let mut silent_pings = 0u32;
    let mut last_ping: Option<Instant> = None;
    loop {
        let (time, timeout) = match backend.upgrade() {
            Some(b) => (
                Duration::from_millis(b.keepalive_ms.load(Relaxed)),
                b.tuning.keepalive_timeout,
            ),
            None => return,
        };
        // Look often enough that silence is noticed about `time` after it began.
        tokio::time::sleep((time / 4).min(Duration::from_secs(1))).await;
        let Some(state) = conn.upgrade() else { return };
        let progress = state.progress.load(Relaxed);
        if state.streams.load(Relaxed) == 0 || progress != seen {
            seen = progress;
            quiet_since = Instant::now();
            silent_pings = 0;
            continue;
        }
        if quiet_since.elapsed() < time
            || (silent_pings >= SILENT_PINGS && last_ping.is_some_and(|t| t.elapsed() < SLOW_PING))
        {
            continue;
        }
        drop(state);
        silent_pings += 1;
        last_ping = Some(Instant::now());
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_)) => quiet_since = Instant::now(),
            outcome => {
                driver.abort();
                let Some(b) = backend.upgrade() else { return };
                b.slots[index].conns().retain(|c| c.id != id);
                let why = match outcome {
                    Ok(Err(e)) => format!("keepalive PING failed: {e}"),
                    _ => format!(
                        "no answer to a keepalive PING within {}s, with calls waiting",
                        timeout.as_secs_f64()
                    ),
                };
                b.events
                    .push("", &b.hostport, "connection_lost", why.clone());
                b.mark_down(index, why);
                return;
            }
        }
    }
}

/// An endpoint's key in the pool.
pub fn pool_key(hostport: &str, tls: Option<&ClientTls>) -> String {
    match tls {
        None => hostport.to_string(),
        Some(tls) => format!("{hostport} {}", tls.key),
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
    tuning: Tuning,
    events: Arc<Events>,
    /// Each engine thread's runtime, in thread order (eager connections are opened on each).
    runtimes: Vec<Handle>,
}

impl Pool {
    /// `max_connections` (≥ 1): per endpoint and thread.
    pub fn new(
        eager: bool,
        max_connections: usize,
        tuning: Tuning,
        events: Arc<Events>,
        runtimes: Vec<Handle>,
    ) -> Self {
        Pool {
            backends: Mutex::new(HashMap::new()),
            eager,
            max_connections,
            tuning,
            events,
            runtimes,
        }
    }

    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    /// The runtime of thread `i` modulo the thread count (for background tasks).
    pub fn runtime(&self, i: usize) -> &Handle {
        &self.runtimes[i % self.runtimes.len()]
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Backend>, usize)>> {
        self.backends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The endpoint `hostport`, reached with `tls` when given.
    pub fn acquire(&self, hostport: &str, tls: Option<&Arc<ClientTls>>) -> Arc<Backend> {
        let key = pool_key(hostport, tls.map(|t| &**t));
        let mut map = self.map();
        if let Some((backend, refs)) = map.get_mut(&key) {
            *refs += 1;
            return Arc::clone(backend);
        }
        let backend = Arc::new(Backend::new(
            hostport.to_string(),
            tls.cloned(),
            self.runtimes.len(),
            self.max_connections,
            self.tuning,
            Arc::clone(&self.events),
        ));
        map.insert(key, (Arc::clone(&backend), 1));
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

    /// Lets go of the endpoint of pool key `key` (`Backend::key`).
    pub fn release(&self, key: &str) {
        let mut map = self.map();
        if let Some((backend, refs)) = map.get_mut(key) {
            *refs -= 1;
            if *refs == 0 {
                backend.drain();
                map.remove(key);
            }
        }
    }

    /// (connected, last error, down, down since) of endpoint `hostport` in use (with whichever
    /// TLS configuration, when several Services reach it differently: the first found).
    pub fn status(&self, hostport: &str) -> Option<(bool, String, bool, f64)> {
        let map = self.map();
        match map.get(hostport) {
            Some((b, _)) => Some(b.status()),
            None => map
                .values()
                .find(|(b, _)| b.hostport == hostport)
                .map(|(b, _)| b.status()),
        }
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

    const TUNING: Tuning = Tuning {
        handshake_timeout: Duration::from_secs(1),
        keepalive_time: Some(Duration::from_secs(5)),
        keepalive_timeout: Duration::from_secs(1),
    };

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
            let backend = Arc::new(Backend::new(
                server(2).await,
                None,
                1,
                MAX,
                TUNING,
                Arc::default(),
            ));
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
                .map(|c| c.state.streams.load(Relaxed))
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
