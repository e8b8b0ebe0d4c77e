//! The Python face of the data path: an `Engine` owns N threads, each running the HTTP/2 proxy
//! on a single-threaded Tokio runtime (see `workers`). Python applies backend sets to it and
//! reads snapshots of its state; no call ever touches Python or waits for the GIL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::{PyLookupError, PyOSError, PyValueError};
use pyo3::prelude::*;
use tokio::sync::watch;

use crate::events::{Event, Events};
use crate::health::{CheckArg, CheckPolicy, Health, OutlierArg, OutlierPolicy, Owner};
use crate::limits::{ClientLimits, LimitCounters};
use crate::locality::{Locality, PlaceArg, ZoneAware, Zones};
use crate::pool::{Pool, Tuning};
use crate::proxy::ENDPOINT_HEADER;
use crate::retry::{Budget, RetryArg, RetryPolicy, ServiceCounters};
use crate::routing::{Debug, Policy, Route, Table, Target};
use crate::slow_start::{Ramp, SlowStart, SlowStartArg};
use crate::stats::{Counters, Stats};
use crate::strategy::{hash_key, Picker, RING_HASH};
use crate::tls::{ClientTls, ClientTlsArg, Paths, ServerTls};
use crate::workers::{self, WorkerCounters};

/// The client port's TLS as Python hands it over: (certificate file, key file, client CA file
/// or "" for no client certificates, allowed client identities, also accept h2c, seconds
/// between reads of the files).
type TlsArg = (String, String, String, Vec<String>, bool, f64);

/// What one endpoint of a Service keeps across set updates: its counters, its failover state,
/// its slow-start ramp and its last weight (an increase ramps).
type EndpointState = (Arc<Stats>, Arc<Health>, Arc<Ramp>, u32);

/// What one Service keeps across set updates: per endpoint (HOST:PORT) its state, its retry
/// budget and its failover counters.
#[derive(Default)]
struct ServiceState {
    endpoints: HashMap<String, EndpointState>,
    budget: Arc<Budget>,
    counters: Arc<ServiceCounters>,
}

/// What every engine thread shares.
pub struct Shared {
    table: RwLock<Table>,
    pool: Pool,
    /// NAMESPACE/NAME → what it keeps across set updates. Per Service, so that applying one
    /// set costs its own endpoints, not every Service's.
    services: Mutex<HashMap<String, ServiceState>>,
    events: Arc<Events>,
    pub counters: Counters,
    pub workers: Box<[WorkerCounters]>,
    pub bounds_ns: Vec<u64>,
    pub max_message_bytes: usize,
    /// Request bytes kept per call so that it can be sent again.
    pub retry_buffer_bytes: usize,
    /// A client connection gets GOAWAY after about this long (±10%); None: never.
    pub max_connection_age: Option<Duration>,
    /// TLS on the client port, if it serves TLS.
    pub tls: Option<Arc<ServerTls>>,
    /// The client port's limits, and how often each was hit.
    pub limits: ClientLimits,
    pub limit_counters: LimitCounters,
    /// Where this proxy runs and how the proxies spread over zones, for zone plans.
    locality: Mutex<Locality>,
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
            self.pool.release(&t.backend.key);
        }
    }
}

/// One eligible endpoint of a set as Python hands it over: (HOST:PORT, pod name or "", weight).
type EndpointArg = (String, String, u32);
/// One row of `Engine.stats()`.
type StatsRow = (
    String,
    String,
    u64,
    u64,
    i64,
    f64,
    Vec<u64>,
    bool,
    String,
    (&'static str, String, f64, u64),
);

fn seconds(name: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| PyValueError::new_err(format!("{name} must be a number of seconds ≥ 0")))
}

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
        max_backend_connections, handshake_timeout_s, keepalive_time_s, keepalive_timeout_s,
        retry_buffer_bytes, limits, tls=None, seed=None, zone=String::new(), node=String::new()
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
        handshake_timeout_s: f64,
        keepalive_time_s: f64,
        keepalive_timeout_s: f64,
        retry_buffer_bytes: usize,
        limits: PyRef<'_, ClientLimits>,
        tls: Option<TlsArg>,
        seed: Option<u64>,
        zone: String,
        node: String,
    ) -> PyResult<Self> {
        let tls = match tls {
            None => None,
            Some((cert, key, client_ca, allowed, allow_h2c, every)) => {
                let paths = Paths {
                    cert: cert.into(),
                    key: key.into(),
                    client_ca: (!client_ca.is_empty()).then(|| client_ca.into()),
                    allowed,
                };
                let every = seconds("tls reload interval", every)?.max(Duration::from_millis(10));
                let tls = ServerTls::load(paths, allow_h2c).map_err(PyValueError::new_err)?;
                Some((Arc::new(tls), every))
            }
        };
        let tuning = Tuning {
            handshake_timeout: seconds("handshake_timeout_s", handshake_timeout_s)?,
            keepalive_time: Some(seconds("keepalive_time_s", keepalive_time_s)?)
                .filter(|d| !d.is_zero()),
            keepalive_timeout: seconds("keepalive_timeout_s", keepalive_timeout_s)?,
        };
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
        let events = Arc::new(Events::default());
        let shared = Arc::new(Shared {
            table: RwLock::new(Table::default()),
            pool: Pool::new(
                eager,
                max_backend_connections,
                tuning,
                Arc::clone(&events),
                runtimes.iter().map(|r| r.handle().clone()).collect(),
            ),
            services: Mutex::new(HashMap::new()),
            events,
            retry_buffer_bytes,
            counters: Counters::default(),
            workers: (0..threads).map(|_| WorkerCounters::default()).collect(),
            bounds_ns: latency_bounds_ns,
            max_message_bytes,
            max_connection_age: (max_connection_age_s > 0.0)
                .then(|| Duration::from_secs_f64(max_connection_age_s)),
            tls: tls.as_ref().map(|(t, _)| Arc::clone(t)),
            limits: limits.clone(),
            limit_counters: LimitCounters::default(),
            locality: Mutex::new(Locality {
                zone,
                node,
                proxies: BTreeMap::new(),
            }),
        });
        if let Some((tls, every)) = tls {
            // Mounted Secrets change by a symlink swap: read the files again now and then.
            let events = Arc::clone(&shared.events);
            runtimes[0].spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match tls.reload() {
                        None => {}
                        Some(Ok(())) => events.push(
                            "",
                            "client port",
                            "certificate_reloaded",
                            "the TLS certificate files changed; new connections use them".into(),
                        ),
                        Some(Err(e)) => events.push(
                            "",
                            "client port",
                            "certificate_error",
                            format!("{e}; connections still use the previous certificate"),
                        ),
                    }
                }
            });
        }
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
    /// endpoint of the set, eligible or not, to explain an empty route. The failover settings
    /// come resolved (defaults live in Python): `retry`, `outlier` and `health_check` are None
    /// when off; `debug` is (debug metadata allowed, endpoint override allowed). `generation`
    /// and `revision` (the set's, and the etcd revision it was stored at) only go into debug
    /// metadata. Raises ValueError for an unknown strategy, a weight of 0 or a bad setting.
    #[pyo3(signature = (
        key, strategy, endpoints, total, *, retry, outlier, health_check, panic_threshold,
        stream_idle_timeout_s, debug, slow_start=None, hash=None, tls=None, zone_aware=None,
        places=None, generation=0, revision=0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        key: String,
        strategy: &str,
        endpoints: Vec<EndpointArg>,
        total: usize,
        retry: Option<RetryArg>,
        outlier: Option<OutlierArg>,
        health_check: Option<CheckArg>,
        panic_threshold: u32,
        stream_idle_timeout_s: f64,
        debug: (bool, bool),
        slow_start: Option<SlowStartArg>,
        hash: Option<(String, u32)>,
        tls: Option<ClientTlsArg>,
        zone_aware: Option<(bool, usize, bool)>,
        places: Option<Vec<PlaceArg>>,
        generation: u64,
        revision: i64,
    ) -> PyResult<()> {
        let invalid = |e: String| PyValueError::new_err(format!("Service {key}: {e}"));
        let policy = Policy {
            retry: retry
                .map(RetryPolicy::from_arg)
                .transpose()
                .map_err(invalid)?,
            outlier: outlier
                .map(OutlierPolicy::from_arg)
                .transpose()
                .map_err(invalid)?,
            panic_threshold: if panic_threshold <= 100 {
                panic_threshold
            } else {
                return Err(invalid("panic threshold must be 0-100%".into()));
            },
            stream_idle_timeout: Some(
                Duration::try_from_secs_f64(stream_idle_timeout_s)
                    .map_err(|_| invalid("stream idle timeout must be ≥ 0 s".into()))?,
            )
            .filter(|d| !d.is_zero()),
            slow_start: slow_start
                .map(SlowStart::from_arg)
                .transpose()
                .map_err(invalid)?,
            hash_header: hash
                .as_ref()
                .map(|(header, _)| http::HeaderName::try_from(header.as_str()))
                .transpose()
                .map_err(|e| invalid(format!("hash header: {e}")))?,
            debug: Debug {
                metadata: debug.0,
                endpoint_override: debug.1,
            },
        };
        let check = health_check
            .map(CheckPolicy::from_arg)
            .transpose()
            .map_err(invalid)?;
        let tls = tls
            .map(ClientTls::load)
            .transpose()
            .map_err(|e| invalid(format!("backend TLS: {e}")))?
            .map(Arc::new);
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
        let keys: Vec<String> = endpoints.iter().map(|(h, _, _)| h.clone()).collect();
        let bound = hash
            .as_ref()
            .map_or(1.25, |(_, percent)| f64::from(*percent) / 100.0);
        let picker = Picker::build(
            strategy,
            &weights,
            &keys,
            start,
            bound,
            format!("Service {key} has no backend that can take requests ({why})"),
        )
        .map_err(invalid)?;
        let shared = &self.shared;
        // ring_hash keeps a key on one endpoint whatever the zone: no zone plan.
        let zones = match zone_aware.filter(|_| strategy != RING_HASH) {
            Some((prefer, min_endpoints, hints)) => {
                let setting = ZoneAware {
                    prefer,
                    min_endpoints,
                    hints,
                };
                let locality = shared.locality.lock().unwrap_or_else(|e| e.into_inner());
                Zones::new(
                    setting,
                    &places.unwrap_or_default(),
                    &weights,
                    &locality,
                    |w| Picker::build(strategy, w, &[], start, bound, String::new()),
                )
                .map_err(invalid)?
            }
            None => None,
        };
        let mut services = shared.services.lock().unwrap_or_else(|e| e.into_inner());
        let service = services.entry(key.clone()).or_default();
        let handshake = shared.pool.tuning().handshake_timeout;
        // A Service's first set does not ramp (there is nothing to protect a newcomer from).
        let seen_before = !service.endpoints.is_empty();
        let targets = endpoints
            .iter()
            .enumerate()
            .map(|(i, (hostport, pod, weight))| {
                let (stats, health, ramp, last_weight) = service
                    .endpoints
                    .entry(hostport.clone())
                    .or_insert_with(|| {
                        let owner = Owner {
                            service: key.clone(),
                            hostport: hostport.clone(),
                            events: Arc::clone(&shared.events),
                            counters: Arc::clone(&service.counters),
                        };
                        let ramp = Ramp::default();
                        if seen_before && policy.slow_start.is_some() {
                            ramp.begin(0.0);
                        }
                        (
                            Arc::new(Stats::new(shared.bounds_ns.len())),
                            Arc::new(Health::new(owner)),
                            Arc::new(ramp),
                            *weight,
                        )
                    });
                if *weight > *last_weight && policy.slow_start.is_some() {
                    ramp.begin(f64::from(*last_weight) / f64::from(*weight));
                }
                *last_weight = *weight;
                health.set_checks(
                    check.as_ref(),
                    shared.pool.runtime(i),
                    handshake,
                    tls.as_ref(),
                );
                let of_pod = if pod.is_empty() {
                    String::new()
                } else {
                    format!(", pod {pod}")
                };
                Target {
                    backend: shared.pool.acquire(hostport, tls.as_ref()),
                    stats: Arc::clone(stats),
                    health: Arc::clone(health),
                    ramp: Arc::clone(ramp),
                    who: format!("backend {hostport} (Service {key}{of_pod})"),
                    pod: pod.clone(),
                }
            })
            .collect();
        // What endpoints that left the set kept goes, unless calls to them are in flight;
        // their health checks stop either way.
        if service.endpoints.len() > endpoints.len() {
            let live: HashSet<&str> = endpoints.iter().map(|(h, _, _)| h.as_str()).collect();
            service.endpoints.retain(|hostport, (s, h, _, _)| {
                let keep = live.contains(hostport.as_str());
                if !keep {
                    h.stop_checks();
                }
                keep || s.in_flight.load(Relaxed) > 0
            });
        }
        let route = Route {
            key,
            strategy: strategy.to_string(),
            generation,
            revision,
            targets,
            weights,
            picker,
            zones,
            policy,
            budget: Arc::clone(&service.budget),
            counters: Arc::clone(&service.counters),
            in_flight: AtomicI64::new(0),
        };
        drop(services);
        let old = shared
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(route);
        if let Some(old) = old {
            shared.release(&old);
        }
        Ok(())
    }

    /// How many live proxies run in each zone (this one included): zone plans follow.
    fn set_proxy_zones(&self, proxies: BTreeMap<String, u32>) {
        let locality = {
            let mut l = self
                .shared
                .locality
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            l.proxies = proxies;
            l.clone()
        };
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        for route in table.routes() {
            if let Some(zones) = &route.zones {
                zones.replan(&locality);
            }
        }
    }

    /// Service `key`'s zone plan in words; None when it has no route or no zone setting.
    fn zone_plan(&self, key: &str) -> Option<String> {
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        table.get(key)?.zones.as_ref().map(Zones::why)
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
        let gone = self
            .shared
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        for (_, health, _, _) in gone.iter().flat_map(|s| s.endpoints.values()) {
            health.stop_checks();
        }
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

    /// (HOST:PORT, why) of the endpoint Service `key`'s next call would get, without picking,
    /// for a call with request `headers` (lower-case names) read as a call's are: ring_hash's
    /// hashed header, and `x-weighbridge-endpoint` (that pod's endpoint); raises LookupError
    /// when the Service has no route or no endpoint to pick, or refuses the pod.
    #[pyo3(signature = (key, headers=None))]
    fn explain(
        &self,
        key: &str,
        headers: Option<HashMap<String, String>>,
    ) -> PyResult<(String, String)> {
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        let route = table
            .get(key)
            .ok_or_else(|| PyLookupError::new_err(format!("no backend set for Service {key}")))?;
        let headers = headers.unwrap_or_default();
        let hash_value =
            (route.policy.hash_header.as_ref()).and_then(|name| headers.get(name.as_str()));
        if let Some(pod) = headers.get(ENDPOINT_HEADER) {
            let i = route
                .forced(pod)
                .map_err(|(_, _, message)| PyLookupError::new_err(message))?;
            return Ok((
                route.targets[i].backend.hostport.clone(),
                route.forced_why(i),
            ));
        }
        let (i, mut why) = route
            .explain(hash_value.map(|v| hash_key(v.as_bytes())))
            .map_err(PyLookupError::new_err)?;
        let target = &route.targets[i];
        if let Some(note) = route.ramp_note(i) {
            why = format!("{why}; {note}");
        }
        if let Some(note) = route.unavailable_note(i) {
            // The call would skip it: say so, and name the next in order that can take it
            // (without picking: explaining changes no state).
            let n = route.targets.len();
            let next = (1..n)
                .map(|k| &route.targets[(i + k) % n])
                .find(|t| t.available());
            why = format!("{why}; {note}");
            return Ok(match next {
                Some(t) => {
                    why.push_str(", so the call goes to one that can take it");
                    (t.backend.hostport.clone(), why)
                }
                None => (target.backend.hostport.clone(), why),
            });
        }
        Ok((target.backend.hostport.clone(), why))
    }

    /// [(HOST:PORT, picks)] of `calls` picks of Service `key`, in the order of the applied
    /// endpoints, made by its strategy as calls would make them, with nothing sent and no
    /// counter changed (`wbctl simulate`; the strategy's state moves on, so simulate on an
    /// engine of its own). Raises LookupError when the Service has no route or no endpoint.
    fn simulate(&self, py: Python<'_>, key: &str, calls: u64) -> PyResult<Vec<(String, u64)>> {
        let route = Arc::clone(
            self.shared
                .table
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .ok_or_else(|| {
                    PyLookupError::new_err(format!("no backend set for Service {key}"))
                })?,
        );
        let counts = py
            .detach(|| route.simulate(calls))
            .map_err(PyLookupError::new_err)?;
        Ok(route
            .targets
            .iter()
            .zip(counts)
            .map(|(t, n)| (t.backend.hostport.clone(), n))
            .collect())
    }

    /// Rows of (NAMESPACE/NAME, HOST:PORT, requests, errors, in flight, latency sum in
    /// seconds, latency bucket counts, connected, last connection error, (state, why, since
    /// (unix seconds), times ejected)), of Service `key` only when given. The state is
    /// `ejected`, `unhealthy`, `connect_failing` or `healthy`, in that order of precedence.
    #[pyo3(signature = (key=None))]
    fn stats(&self, key: Option<&str>) -> Vec<StatsRow> {
        let services = self
            .shared
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        services
            .iter()
            .filter(|(k, _)| key.is_none_or(|key| key == k.as_str()))
            .flat_map(|(key, service)| service.endpoints.iter().map(move |(h, e)| (key, h, e)))
            .map(|(key, hostport, (s, health, _, _))| {
                let (connected, last_error, down, down_since) =
                    self.shared.pool.status(hostport).unwrap_or_default();
                let (state, why, since) = match health.state() {
                    Some(state) => state,
                    None if down => ("connect_failing", last_error.clone(), down_since),
                    None => ("healthy", String::new(), 0.0),
                };
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
                    (state, why, since, health.ejections()),
                )
            })
            .collect()
    }

    /// Rows of (NAMESPACE/NAME, counter, value): transparent_retries, retries,
    /// retry_budget_exhausted, ejections, health_checks_passed, health_checks_failed.
    fn failover_counters(&self) -> Vec<(String, &'static str, u64)> {
        let services = self
            .shared
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        services
            .iter()
            .flat_map(|(key, s)| {
                s.counters
                    .snapshot()
                    .into_iter()
                    .map(move |(name, n)| (key.clone(), name, n))
            })
            .collect()
    }

    /// The state changes since the last call, oldest first: (unix time, NAMESPACE/NAME or ""
    /// for a connection-level change, HOST:PORT, state, why).
    fn events(&self) -> Vec<Event> {
        self.shared.events.drain()
    }

    /// State changes dropped because nobody read them in time.
    #[getter]
    fn events_dropped(&self) -> u64 {
        self.shared.events.dropped.load(Relaxed)
    }

    /// [(reason, client connections refused at TLS)]: `plaintext` on a TLS-only port,
    /// `no_handshake` in time, `handshake_failed` (a refused client certificate among them).
    fn tls_failures(&self) -> Vec<(&'static str, u64)> {
        self.shared.counters.tls_failures()
    }

    /// [(limit, times a client connection hit it)]: see `limits::Limit`.
    fn client_limits(&self) -> Vec<(&'static str, u64)> {
        self.shared.limit_counters.snapshot()
    }

    /// Client connections open now, on all threads.
    #[getter]
    fn client_connections(&self) -> usize {
        self.shared.limit_counters.connections.load(Relaxed)
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
