//! Limits that keep the client port up whatever clients send: how long a connection may take
//! to start and may idle, how many there may be, how many streams and how large a header list
//! each may carry, PINGs that find clients gone silent, and what ends a flood. Their values
//! come from Python (defaults live in ProxySettings); this module holds them, counts each time
//! one is hit, and keeps the per-connection bookkeeping the proxy checks them against.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tokio::time::Instant;

/// A stream the client resets sooner than this after opening it, before any response, counts
/// towards a rapid reset (CVE-2023-44487), as Envoy counts premature resets.
pub const PREMATURE_RESET_WITHIN: Duration = Duration::from_secs(1);
/// A connection is ended for rapid reset once it has this many premature resets and they are
/// at least half of its streams: a client cancelling now and then never comes near it.
pub const RAPID_RESET_MIN: u32 = 100;

/// The client port's limits, built once by Python and handed to the engine.
#[pyclass(frozen, module = "weighbridge_native")]
#[derive(Clone)]
pub struct ClientLimits {
    /// From accept to a complete HTTP/2 connection preface (TLS handshake included).
    pub handshake_timeout: Duration,
    /// A connection without calls this long gets GOAWAY; None: never.
    pub idle_timeout: Option<Duration>,
    /// Client connections open at once on the whole proxy; beyond, new ones are closed.
    pub max_connections: usize,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised and enforced (REFUSED_STREAM beyond).
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE advertised and enforced (HTTP 431 beyond).
    pub max_header_list_size: u32,
    /// A PING to the client this often; None: none.
    pub keepalive_time: Option<Duration>,
    /// A PING unanswered this long closes the connection.
    pub keepalive_timeout: Duration,
    /// How long a call waits for a free stream on a backend whose connections are all full.
    pub backend_stream_wait: Duration,
}

fn secs(name: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| PyValueError::new_err(format!("{name} must be a number of seconds ≥ 0")))
}

#[pymethods]
impl ClientLimits {
    /// Every limit is required (their defaults live in Python). Durations in seconds; 0 turns
    /// off the idle timeout and keepalive PINGs.
    #[new]
    #[pyo3(signature = (
        *, handshake_timeout_s, idle_timeout_s, max_connections, max_concurrent_streams,
        max_header_list_size, keepalive_time_s, keepalive_timeout_s, backend_stream_wait_s
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        handshake_timeout_s: f64,
        idle_timeout_s: f64,
        max_connections: usize,
        max_concurrent_streams: u32,
        max_header_list_size: u32,
        keepalive_time_s: f64,
        keepalive_timeout_s: f64,
        backend_stream_wait_s: f64,
    ) -> PyResult<Self> {
        let positive = |name: &str, s: f64| {
            secs(name, s).and_then(|d| {
                if d.is_zero() {
                    Err(PyValueError::new_err(format!("{name} must be > 0")))
                } else {
                    Ok(d)
                }
            })
        };
        if max_connections == 0 {
            return Err(PyValueError::new_err("max_connections must be at least 1"));
        }
        if max_concurrent_streams == 0 {
            return Err(PyValueError::new_err(
                "max_concurrent_streams must be at least 1",
            ));
        }
        if max_header_list_size < 1024 {
            return Err(PyValueError::new_err(
                "max_header_list_size must be at least 1024 bytes",
            ));
        }
        Ok(ClientLimits {
            handshake_timeout: positive("handshake_timeout_s", handshake_timeout_s)?,
            idle_timeout: Some(secs("idle_timeout_s", idle_timeout_s)?).filter(|d| !d.is_zero()),
            max_connections,
            max_concurrent_streams,
            max_header_list_size,
            keepalive_time: Some(secs("keepalive_time_s", keepalive_time_s)?)
                .filter(|d| !d.is_zero()),
            keepalive_timeout: positive("keepalive_timeout_s", keepalive_timeout_s)?,
            backend_stream_wait: positive("backend_stream_wait_s", backend_stream_wait_s)?,
        })
    }
}

/// A limit hit by a client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// No complete TLS handshake and HTTP/2 preface within the handshake timeout.
    HandshakeTimeout,
    /// Something other than the HTTP/2 connection preface: closed.
    InvalidPreface,
    /// The proxy already had its maximum of client connections: closed at once.
    MaxConnections,
    /// No calls for the idle timeout: GOAWAY.
    IdleTimeout,
    /// A PING to the client went unanswered: closed.
    KeepaliveTimeout,
    /// Streams the HTTP/2 layer answered itself: beyond the stream limit (REFUSED_STREAM), a
    /// header list over the limit (431), or reset by the client before they were accepted.
    StreamsRefused,
    /// Mostly streams reset by the client right after opening them: GOAWAY.
    RapidReset,
    /// The HTTP/2 layer ended the connection with ENHANCE_YOUR_CALM: a flood of CONTINUATION,
    /// of resets before accept, or of frames it had to reset.
    Flood,
    /// The HTTP/2 layer ended the connection for another protocol error.
    ProtocolError,
}

impl Limit {
    pub const ALL: [Limit; 9] = [
        Limit::HandshakeTimeout,
        Limit::InvalidPreface,
        Limit::MaxConnections,
        Limit::IdleTimeout,
        Limit::KeepaliveTimeout,
        Limit::StreamsRefused,
        Limit::RapidReset,
        Limit::Flood,
        Limit::ProtocolError,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::InvalidPreface => "invalid_preface",
            Limit::MaxConnections => "max_connections",
            Limit::IdleTimeout => "idle_timeout",
            Limit::KeepaliveTimeout => "keepalive_timeout",
            Limit::StreamsRefused => "streams_refused",
            Limit::RapidReset => "rapid_reset",
            Limit::Flood => "flood",
            Limit::ProtocolError => "protocol_error",
        }
    }
}

/// How often each limit was hit, and the client connections open now, on the whole proxy.
#[derive(Default)]
pub struct LimitCounters {
    hits: [AtomicU64; Limit::ALL.len()],
    pub connections: AtomicUsize,
}

impl LimitCounters {
    pub fn hit(&self, limit: Limit) {
        self.add(limit, 1);
    }

    pub fn add(&self, limit: Limit, n: u64) {
        self.hits[limit as usize].fetch_add(n, Relaxed);
    }

    /// [(limit, times hit)]
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Limit::ALL
            .iter()
            .map(|l| (l.name(), self.hits[*l as usize].load(Relaxed)))
            .collect()
    }
}

/// One client connection's bookkeeping, shared with its calls (all on the same thread).
pub struct Connection {
    started: Instant,
    /// Calls open now.
    open: AtomicU32,
    /// When the last call ended, in ms since `started`.
    idle_since_ms: AtomicU64,
    /// Streams accepted, and those the client reset prematurely.
    accepted: AtomicU32,
    premature: AtomicU32,
}

impl Connection {
    pub fn new() -> Self {
        Connection {
            started: Instant::now(),
            open: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            accepted: AtomicU32::new(0),
            premature: AtomicU32::new(0),
        }
    }

    /// A call begins; it ends when the guard drops.
    pub fn call(&self) -> CallGuard<'_> {
        self.open.fetch_add(1, Relaxed);
        self.accepted.fetch_add(1, Relaxed);
        CallGuard(self)
    }

    /// The client reset a call before its response, soon after opening it.
    pub fn premature_reset(&self) {
        self.premature.fetch_add(1, Relaxed);
    }

    /// Whether the client mostly resets what it opens (rapid reset).
    pub fn rapid_reset(&self) -> bool {
        let premature = self.premature.load(Relaxed);
        premature >= RAPID_RESET_MIN && premature * 2 >= self.accepted.load(Relaxed)
    }

    /// When the connection will have been without calls for `idle`: None while calls are open.
    pub fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.open.load(Relaxed) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Relaxed));
        Some(self.started + since + idle)
    }
}

pub struct CallGuard<'a>(&'a Connection);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let c = self.0;
        let ms = c.started.elapsed().as_millis().min(u64::MAX as u128) as u64;
        c.idle_since_ms.store(ms, Relaxed);
        c.open.fetch_sub(1, Relaxed);
    }
}

/// A call's last sign of life, for the stream idle timeout: every frame either way moves it.
pub struct Activity {
    started: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// When the call began.
    pub fn started(&self) -> Instant {
        self.started
    }

    #[inline]
    pub fn touch(&self) {
        let ms = self.started.elapsed().as_millis().min(u64::MAX as u128) as u64;
        self.last_ms.store(ms, Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.started + Duration::from_millis(self.last_ms.load(Relaxed));
            let at = last + idle;
            if Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rapid_reset_needs_many_and_most() {
        let c = Connection::new();
        for _ in 0..(RAPID_RESET_MIN - 1) {
            drop(c.call());
            c.premature_reset();
        }
        assert!(!c.rapid_reset(), "below the minimum");
        drop(c.call());
        c.premature_reset();
        assert!(c.rapid_reset());
        for _ in 0..(RAPID_RESET_MIN + 1) {
            drop(c.call());
        }
        assert!(!c.rapid_reset(), "fewer than half of the streams");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_deadline_counts_from_the_last_call() {
        let c = Connection::new();
        let idle = Duration::from_secs(60);
        assert_eq!(c.idle_deadline(idle), Some(c.started + idle));
        let guard = c.call();
        assert_eq!(c.idle_deadline(idle), None, "a call is open");
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(guard);
        let at = c.idle_deadline(idle).unwrap();
        assert_eq!(at, c.started + Duration::from_secs(160));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_waits_for_silence() {
        let a = Activity::new();
        let idle = Duration::from_secs(10);
        let begun = Instant::now();
        let watch = async {
            a.idle_for(idle).await;
            Instant::now()
        };
        let keep_busy = async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                a.touch();
            }
            std::future::pending::<()>().await;
        };
        let ended = tokio::select! {
            at = watch => at,
            () = keep_busy => unreachable!(),
        };
        // Touched at 6, 12 and 18 s: silent from 18 s, so idle at 28 s.
        assert_eq!(ended - begun, Duration::from_secs(28));
    }
}
