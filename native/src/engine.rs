//! The Python face of the data path: an `Engine` owns N threads, each running the HTTP/2 proxy
//! on a single-threaded Tokio runtime (see `workers`). Python applies backend sets to it and
//! reads snapshots of its state; no call ever touches Python or waits for the GIL.

use std::collections::{HashMap, HashSet};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::{PyLookupError, PyOSError, PyValueError};
use pyo3::prelude::*;
use tokio::sync::watch;

use crate::pool::Pool;
use crate::routing::{Route, Table, Target};
use crate::stats::{Counters, Stats};
use crate::strategy::Picker;
use crate::workers::{self, WorkerCounters};

/// What every engine thread shares.
pub struct Shared {
    table: RwLock<Table>,
    pool: Pool,
    /// NAMESPACE/NAME → HOST:PORT → counters; they outlive set updates. Per Service, so that
    /// applying one set costs its own endpoints, not every Service's.
    stats: Mutex<HashMap<String, HashMap<String, Arc<Stats>>>>,
    pub counters: Counters,
    pub workers: Box<[WorkerCounters]>,
    pub bounds_ns: Vec<u64>,
    pub max_message_bytes: usize,
    /// A client connection gets GOAWAY after about this long (±10%); None: never.
    pub max_connection_age: Option<Duration>,
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

/// One eligible endpoint of a set as Python hands it over: (HOST:PORT, pod name or "", weight).
type EndpointArg = (String, String, u32);
/// One row of `Engine.stats()`.
type StatsRow = (String, String, u64, u64, i64, f64, Vec<u64>, bool, String);

#[pyclass(frozen, module = "weighbridge_native")]
pub struct Engine {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    kill: watch::Sender<bool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Where rotations start: a seeded generator when the caller asked for repeatable runs.
    starts: Mutex<fastrand::Rng>,
}

#[pymethods]
impl Engine {
    /// Serves the listening socket `fd` (duplicated; the caller keeps its own) on `threads`
    /// threads. Every setting is required: their defaults live in Python's ProxySettings.
    #[new]
    #[pyo3(signature = (
        fd, *, threads, max_message_bytes, eager, latency_bounds_ns, max_connection_age_s,
        max_backend_connections, seed=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        fd: RawFd,
        threads: usize,
        max_message_bytes: usize,
        eager: bool,
        latency_bounds_ns: Vec<u64>,
        max_connection_age_s: f64,
        max_backend_connections: usize,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        if threads == 0 {
            return Err(PyValueError::new_err("threads must be at least 1"));
        }
        if max_backend_connections == 0 {
            return Err(PyValueError::new_err(
                "max_backend_connections must be at least 1",
            ));
        }
        if !(max_connection_age_s.is_finite() && max_connection_age_s >= 0.0) {
            return Err(PyValueError::new_err(
                "max_connection_age_s must be a number of seconds ≥ 0",
            ));
        }
        let os = |e: std::io::Error| PyOSError::new_err(e.to_string());
        let borrowed =
            std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) });
        let mut runtimes = Vec::with_capacity(threads);
        let mut listeners = Vec::with_capacity(threads);
        for _ in 0..threads {
            let listener = borrowed.try_clone().map_err(os)?;
            listener.set_nonblocking(true).map_err(os)?;
            listeners.push(listener);
            runtimes.push(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(os)?,
            );
        }
        let shared = Arc::new(Shared {
            table: RwLock::new(Table::default()),
            pool: Pool::new(
                eager,
                max_backend_connections,
                runtimes.iter().map(|r| r.handle().clone()).collect(),
            ),
            stats: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            workers: (0..threads).map(|_| WorkerCounters::default()).collect(),
            bounds_ns: latency_bounds_ns,
            max_message_bytes,
            max_connection_age: (max_connection_age_s > 0.0)
                .then(|| Duration::from_secs_f64(max_connection_age_s)),
        });
        let (stop, stop_rx) = watch::channel(false);
        let (kill, kill_rx) = watch::channel(false);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let mut handles = Vec::with_capacity(threads);
        for (index, (runtime, listener)) in runtimes.into_iter().zip(listeners).enumerate() {
            let serving = Arc::clone(&shared);
            let (stop_rx, mut kill_rx, started_tx) =
                (stop_rx.clone(), kill_rx.clone(), started_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("weighbridge-{index}"))
                .spawn(move || {
                    workers::enter(index);
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
                        let _ = kill_rx.wait_for(|&k| k).await;
                    });
                    runtime.shutdown_timeout(Duration::from_millis(200));
                })
                .map_err(os)?;
            handles.push(thread);
        }
        let engine = Engine {
            shared,
            stop,
            kill,
            threads: Mutex::new(handles),
            starts: Mutex::new(seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed)),
        };
        for _ in 0..threads {
            match started_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(PyOSError::new_err(e)),
                Err(_) => return Err(PyOSError::new_err("an engine thread died at start")),
            }
        }
        Ok(engine)
    }

    /// How many threads carry calls.
    #[getter]
    fn threads(&self) -> usize {
        self.shared.workers.len()
    }

    /// Installs (replaces) the route of Service `key` (NAMESPACE/NAME) in one swap.
    ///
    /// `endpoints` are the eligible ones, as (HOST:PORT, pod, weight > 0); `total` counts every
    /// endpoint of the set, eligible or not, to explain an empty route. Raises ValueError for
    /// an unknown strategy or a weight of 0.
    fn apply(
        &self,
        key: String,
        strategy: &str,
        endpoints: Vec<EndpointArg>,
        total: usize,
    ) -> PyResult<()> {
        let weights: Vec<u32> = endpoints.iter().map(|(_, _, w)| *w).collect();
        let why = if total == 0 {
            "no endpoints".to_string()
        } else {
            format!("{total} endpoints, none serving, not terminating and of weight > 0")
        };
        let start = self
            .starts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .u64(..);
        let picker = Picker::build(
            strategy,
            &weights,
            start,
            format!("Service {key} has no backend that can take requests ({why})"),
        )
        .map_err(|e| PyValueError::new_err(format!("Service {key}: {e}")))?;
        let shared = &self.shared;
        let mut all_stats = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        let stats = all_stats.entry(key.clone()).or_default();
        let targets = endpoints
            .iter()
            .map(|(hostport, pod, _)| {
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
            let live: HashSet<&str> = endpoints.iter().map(|(h, _, _)| h.as_str()).collect();
            stats.retain(|hostport, s| {
                s.in_flight.load(Relaxed) > 0 || live.contains(hostport.as_str())
            });
        }
        drop(all_stats);
        let old = shared
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Route {
                key,
                targets,
                picker,
            });
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
            .map_err(PyLookupError::new_err)
    }

    /// (HOST:PORT, why) of the endpoint Service `key`'s next call would get, without picking;
    /// raises LookupError when the Service has no route or no endpoint to pick.
    fn explain(&self, key: &str) -> PyResult<(String, String)> {
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        let route = table
            .get(key)
            .ok_or_else(|| PyLookupError::new_err(format!("no backend set for Service {key}")))?;
        let (i, why) = route
            .picker
            .explain()
            .map_err(|m| PyLookupError::new_err(m.to_string()))?;
        Ok((route.targets[i].backend.hostport.clone(), why))
    }

    /// Rows of (NAMESPACE/NAME, HOST:PORT, requests, errors, in flight, latency sum in
    /// seconds, latency bucket counts, connected, last connection error), of Service `key`
    /// only when given.
    #[pyo3(signature = (key=None))]
    fn stats(&self, key: Option<&str>) -> Vec<StatsRow> {
        let stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats
            .iter()
            .filter(|(k, _)| key.is_none_or(|key| key == k.as_str()))
            .flat_map(|(key, per_endpoint)| per_endpoint.iter().map(move |(h, s)| (key, h, s)))
            .map(|(key, hostport, s)| {
                let (connected, last_error) = self.shared.pool.status(hostport).unwrap_or_default();
                (
                    key.clone(),
                    hostport.clone(),
                    s.requests.load(Relaxed),
                    s.errors.load(Relaxed),
                    s.in_flight.load(Relaxed),
                    s.latency_ns.load(Relaxed) as f64 / 1e9,
                    s.buckets.iter().map(|b| b.load(Relaxed)).collect(),
                    connected,
                    last_error,
                )
            })
            .collect()
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

    /// Per thread: (client connections accepted, open now, calls received).
    fn thread_counters(&self) -> Vec<(u64, i64, u64)> {
        self.shared
            .workers
            .iter()
            .map(WorkerCounters::snapshot)
            .collect()
    }

    /// Stops accepting and sends GOAWAY on every connection; calls in flight go on.
    fn goaway(&self) {
        let _ = self.stop.send(true);
    }

    /// Ends everything at once (call `goaway` and wait for calls first to be gentle).
    fn close(&self, py: Python<'_>) {
        let _ = self.stop.send(true);
        let _ = self.kill.send(true);
        self.shared.pool.drain_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        py.detach(|| {
            for thread in threads {
                let _ = thread.join();
            }
        });
    }
}
