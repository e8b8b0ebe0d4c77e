//! Counters of one endpoint within one Service, read by the admin API and metrics at scrape
//! time; the request path only does relaxed atomic adds.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::strategy::Ewma;

pub struct Stats {
    /// Peak EWMA of the time to response headers (peak_ewma picks by it).
    pub rtt: Ewma,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub in_flight: AtomicI64,
    pub latency_ns: AtomicU64,
    pub buckets: Box<[AtomicU64]>,
}

impl Stats {
    pub fn new(bounds: usize) -> Self {
        Stats {
            rtt: Ewma::default(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            latency_ns: AtomicU64::new(0),
            buckets: (0..=bounds).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Records a finished call in the first bucket whose bound is ≥ its duration.
    pub fn observe(&self, bounds_ns: &[u64], elapsed: Duration, ok: bool) {
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        self.latency_ns.fetch_add(ns, Relaxed);
        self.buckets[bounds_ns.partition_point(|&b| b < ns)].fetch_add(1, Relaxed);
        if !ok {
            self.errors.fetch_add(1, Relaxed);
        }
    }
}

/// Process-wide counters of the calls the proxy received and those it ended itself.
#[derive(Default)]
pub struct Counters {
    pub calls: AtomicU64,
    pub in_flight: AtomicI64,
    /// Client connections refused at TLS, by `TlsFailure`.
    tls_failures: [AtomicU64; TlsFailure::ALL.len()],
    local: [AtomicU64; LocalError::ALL.len()],
}

#[derive(Clone, Copy)]
pub enum LocalError {
    NoRoute,
    NoBackend,
    ConnectFailed,
    BackendReset,
    BackendLost,
    MessageTooBig,
    DeadlineExceeded,
    RetryBudgetExhausted,
    PerTryTimeout,
    /// No free stream on the backend within the wait (`--backend-stream-wait`).
    BackendBusy,
    /// Nothing moved on the call for the stream idle timeout.
    StreamIdleTimeout,
    /// `x-weighbridge-endpoint` on a Service that does not allow it.
    EndpointOverrideDenied,
    /// `x-weighbridge-endpoint` named no pod of the Service that takes calls.
    EndpointNotFound,
}

impl LocalError {
    pub const ALL: [LocalError; 13] = [
        LocalError::NoRoute,
        LocalError::NoBackend,
        LocalError::ConnectFailed,
        LocalError::BackendReset,
        LocalError::BackendLost,
        LocalError::MessageTooBig,
        LocalError::DeadlineExceeded,
        LocalError::RetryBudgetExhausted,
        LocalError::PerTryTimeout,
        LocalError::BackendBusy,
        LocalError::StreamIdleTimeout,
        LocalError::EndpointOverrideDenied,
        LocalError::EndpointNotFound,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LocalError::NoRoute => "no_route",
            LocalError::NoBackend => "no_backend",
            LocalError::ConnectFailed => "connect_failed",
            LocalError::BackendReset => "backend_reset",
            LocalError::BackendLost => "backend_lost",
            LocalError::MessageTooBig => "message_too_big",
            LocalError::DeadlineExceeded => "deadline_exceeded",
            LocalError::RetryBudgetExhausted => "retry_budget_exhausted",
            LocalError::PerTryTimeout => "per_try_timeout",
            LocalError::BackendBusy => "backend_busy",
            LocalError::StreamIdleTimeout => "stream_idle_timeout",
            LocalError::EndpointOverrideDenied => "endpoint_override_denied",
            LocalError::EndpointNotFound => "endpoint_not_found",
        }
    }
}

/// Why a client connection was refused at TLS.
#[derive(Clone, Copy)]
pub enum TlsFailure {
    /// Plaintext on a port that serves TLS only.
    Plaintext,
    /// The connection ended before its first byte (a timeout counts as the handshake timeout).
    NoHandshake,
    /// The handshake failed: a refused client certificate or identity, no common
    /// version or cipher suite, a client that does not trust the proxy's certificate.
    HandshakeFailed,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 3] = [
        TlsFailure::Plaintext,
        TlsFailure::NoHandshake,
        TlsFailure::HandshakeFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TlsFailure::Plaintext => "plaintext",
            TlsFailure::NoHandshake => "no_handshake",
            TlsFailure::HandshakeFailed => "handshake_failed",
        }
    }
}

impl Counters {
    pub fn tls_failed(&self, why: TlsFailure) {
        self.tls_failures[why as usize].fetch_add(1, Relaxed);
    }

    /// [(reason, client connections refused at TLS for it)]
    pub fn tls_failures(&self) -> Vec<(&'static str, u64)> {
        TlsFailure::ALL
            .iter()
            .map(|f| (f.name(), self.tls_failures[*f as usize].load(Relaxed)))
            .collect()
    }

    pub fn error(&self, e: LocalError) {
        self.local[e as usize].fetch_add(1, Relaxed);
    }

    pub fn local_errors(&self) -> Vec<(&'static str, u64)> {
        LocalError::ALL
            .iter()
            .map(|e| (e.name(), self.local[*e as usize].load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}
