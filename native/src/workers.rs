//! The engine's threads: N single-threaded Tokio runtimes, each accepting from the same
//! listening socket and carrying the calls of the connections it accepted.
//!
//! A client connection lives on the thread that accepted it, and so do the backend connections
//! that thread opened (each thread has its own connection to each endpoint, as Envoy's workers
//! do), so a call never crosses threads. What must be one per process is shared: the routing
//! table, the pickers (one rotation, however many threads), counters.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the engine thread running this code (0 elsewhere).
#[inline]
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Marks this thread as engine thread `index`.
pub fn enter(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// What one thread carries, to show how the load spreads.
#[derive(Default)]
pub struct WorkerCounters {
    pub connections: AtomicU64,
    pub open: AtomicI64,
    pub calls: AtomicU64,
}

impl WorkerCounters {
    pub fn snapshot(&self) -> (u64, i64, u64) {
        (
            self.connections.load(Relaxed),
            self.open.load(Relaxed),
            self.calls.load(Relaxed),
        )
    }
}
