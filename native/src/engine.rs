//! The Python face of the data path: an `Engine` owns a thread running the HTTP/2 proxy on
//! a single-threaded Tokio runtime. Python applies backend sets to it and reads its counters;
//! no request ever touches Python or waits for the GIL.

use std::collections::{HashMap, HashSet};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use tokio::sync::{oneshot, watch};

use crate::pick::Plan;
use crate::pool::Pool;
use crate::routing::{Route, Table, Target};
use crate::stats::{Counters, Stats};

pub struct Shared {
    table: RwLock<Table>,
    pool: Pool,
    /// NAMESPACE/NAME → HOST:PORT → counters; they outlive set updates. Per Service, so that
    /// applying one set costs its own endpoints, not every Service's.
    stats: Mutex<HashMap<String, HashMap<String, Arc<Stats>>>>,
    pub counters: Counters,
    pub bounds_ns: Vec<u64>,
    pub max_message_bytes: usize,
}

impl Shared {
    #[inline]
    pub fn route(&self, authority: &str, path: &str) -> Result<(Arc<Route>, &'static str), String> {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .route(authority, path)
    }

    fn release(&self, route: &Route) {
        for t in &route.targets {
            self.pool.release(&t.backend.hostport);
        }
    }
}

/// One endpoint of a set as Python hands it over: (HOST:PORT, pod name or "").
type EndpointArg = (String, String);
/// One row of `Engine.stats()`.
type StatsRow = (String, String, u64, u64, i64, f64, Vec<u64>);

#[pyclass(frozen, module = "weighbridge_native")]
pub struct Engine {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[pymethods]
impl Engine {
    /// Serves the listening socket `fd` (duplicated; the caller keeps its own).
    #[new]
    #[pyo3(signature = (fd, *, max_message_bytes, eager, latency_bounds_ns))]
    fn new(
        fd: RawFd,
        max_message_bytes: usize,
        eager: bool,
        latency_bounds_ns: Vec<u64>,
    ) -> PyResult<Self> {
        let borrowed =
            std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) });
        let listener = borrowed
            .try_clone()
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("weighbridge-data")
            .build()
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let shared = Arc::new(Shared {
            table: RwLock::new(Table::default()),
            pool: Pool::new(eager, runtime.handle().clone()),
            stats: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            bounds_ns: latency_bounds_ns,
            max_message_bytes,
        });
        let (stop, stop_rx) = watch::channel(false);
        let (kill, kill_rx) = oneshot::channel::<()>();
        let serving = Arc::clone(&shared);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("weighbridge-data".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = started_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = started_tx.send(Ok(()));
                    tokio::spawn(crate::proxy::serve(serving, listener, stop_rx));
                    let _ = kill_rx.await;
                });
                runtime.shutdown_timeout(Duration::from_millis(200));
            })
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(PyOSError::new_err(e)),
            Err(_) => return Err(PyOSError::new_err("data-path thread died at start")),
        }
        Ok(Engine {
            shared,
            stop,
            kill: Mutex::new(Some(kill)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Installs (replaces) the route of Service `key` (NAMESPACE/NAME) in one swap.
    ///
    /// `plan` is how to pick per request: "cycle" walks `table` (backend indices) from
    /// `start`; "uniform"; "cumulative" draws against cumulative weights `table`; "smooth"
    /// runs smooth WRR over weights `table` (started `start` steps in); "fail" fails every
    /// pick with `message`.
    #[pyo3(signature = (key, endpoints, plan, table, start, message))]
    fn apply(
        &self,
        key: String,
        endpoints: Vec<EndpointArg>,
        plan: &str,
        table: Vec<u64>,
        start: u64,
        message: String,
    ) -> PyResult<()> {
        let plan = Plan::build(plan, table, start, message).map_err(PyValueError::new_err)?;
        let n = endpoints.len();
        let fits = match &plan {
            Plan::Cycle { order, .. } => n > 0 && order.iter().all(|&i| (i as usize) < n),
            Plan::Uniform => n > 0,
            Plan::Cumulative { cumulative } => cumulative.len() == n,
            Plan::Smooth { weights, .. } => weights.len() == n,
            Plan::Fail(_) => true,
        };
        if !fits {
            return Err(PyValueError::new_err(format!(
                "pick plan does not fit the {n} endpoints of {key}"
            )));
        }
        let shared = &self.shared;
        let mut all_stats = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        let stats = all_stats.entry(key.clone()).or_default();
        let targets = endpoints
            .iter()
            .map(|(hostport, pod)| {
                let counters = stats
                    .entry(hostport.clone())
                    .or_insert_with(|| Arc::new(Stats::new(shared.bounds_ns.len())));
                let pod = if pod.is_empty() {
                    String::new()
                } else {
                    format!(", pod {pod}")
                };
                Target {
                    backend: shared.pool.acquire(hostport),
                    stats: Arc::clone(counters),
                    who: format!("backend {hostport} (Service {key}{pod})"),
                }
            })
            .collect();
        // Counters of endpoints that left the set go, unless calls to them are in flight.
        if stats.len() > endpoints.len() {
            let live: HashSet<&str> = endpoints.iter().map(|(h, _)| h.as_str()).collect();
            stats.retain(|hostport, s| {
                s.in_flight.load(Relaxed) > 0 || live.contains(hostport.as_str())
            });
        }
        drop(all_stats);
        let old = shared
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Route { key, targets, plan });
        if let Some(old) = old {
            shared.release(&old);
        }
        Ok(())
    }

    /// Removes Service `key`'s route: its calls fail with "no backend set" from now on.
    fn remove(&self, key: &str) {
        let old = self
            .shared
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(old) = old {
            self.shared.release(&old);
        }
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// gRPC service name → NAMESPACE/NAME, for calls whose authority names no Service.
    fn set_grpc_services(&self, table: HashMap<String, String>) {
        self.shared
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_grpc_services(table);
    }

    /// (NAMESPACE/NAME, how it matched) for a call, or raises LookupError with the reason.
    fn route(&self, authority: &str, path: &str) -> PyResult<(String, &'static str)> {
        self.shared
            .route(authority, path)
            .map(|(r, how)| (r.key.clone(), how))
            .map_err(pyo3::exceptions::PyLookupError::new_err)
    }

    /// Where Service `key`'s rotation stands ("cycle" plans): the position of the next pick.
    fn cursor(&self, key: &str) -> Option<usize> {
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        table.get(key).and_then(|r| r.plan.cursor())
    }

    /// Rows of (NAMESPACE/NAME, HOST:PORT, requests, errors, in flight, latency sum in
    /// seconds, latency bucket counts), of Service `key` only when given.
    #[pyo3(signature = (key=None))]
    fn stats(&self, key: Option<&str>) -> Vec<StatsRow> {
        let stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats
            .iter()
            .filter(|(k, _)| key.is_none_or(|key| key == k.as_str()))
            .flat_map(|(key, per_endpoint)| per_endpoint.iter().map(move |(h, s)| (key, h, s)))
            .map(|(key, hostport, s)| {
                (
                    key.clone(),
                    hostport.clone(),
                    s.requests.load(Relaxed),
                    s.errors.load(Relaxed),
                    s.in_flight.load(Relaxed),
                    s.latency_ns.load(Relaxed) as f64 / 1e9,
                    s.buckets.iter().map(|b| b.load(Relaxed)).collect(),
                )
            })
            .collect()
    }

    /// Rows of (HOST:PORT, connected, last error) for every endpoint in use, or for those of
    /// Service `key` only.
    #[pyo3(signature = (key=None))]
    fn backends(&self, key: Option<&str>) -> Vec<(String, bool, String)> {
        let Some(key) = key else {
            return self.shared.pool.status();
        };
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        table.get(key).map_or_else(Vec::new, |route| {
            route
                .targets
                .iter()
                .map(|t| {
                    let b = &t.backend;
                    (b.hostport.clone(), b.connected(), b.last_error())
                })
                .collect()
        })
    }

    /// (calls received, calls in flight, [(reason, calls the proxy ended itself)]).
    fn counters(&self) -> (u64, i64, Vec<(&'static str, u64)>) {
        let c = &self.shared.counters;
        (
            c.calls.load(Relaxed),
            c.in_flight.load(Relaxed),
            c.local_errors(),
        )
    }

    /// Stops accepting and sends GOAWAY on every connection; calls in flight go on.
    fn goaway(&self) {
        let _ = self.stop.send(true);
    }

    /// Ends everything at once (call `goaway` and wait for calls first to be gentle).
    fn close(&self, py: Python<'_>) {
        let _ = self.stop.send(true);
        if let Some(kill) = self.kill.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = kill.send(());
        }
        self.shared.pool.drain_all();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            py.detach(|| {
                let _ = thread.join();
            });
        }
    }
}
