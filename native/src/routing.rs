//! Which backend set a call belongs to.
//!
//! A call reaches Service NAMESPACE/NAME when its `:authority` (any port) is `NAME.NAMESPACE`,
//! `NAME.NAMESPACE.svc` or `NAME.NAMESPACE.svc.cluster.local`; failing that, when the gRPC
//! service in its path (`/pkg.Service/Method`) is one the set declares. Routes are keyed by
//! `NAME.NAMESPACE` so that a lookup needs no allocation.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::grpc;
use crate::health::{Health, OutlierPolicy};
use crate::locality::Zones;
use crate::pool::Backend;
use crate::retry::{Budget, RetryPolicy, ServiceCounters};
use crate::slow_start::{Ramp, SlowStart};
use crate::stats::{LocalError, Stats};
use crate::strategy::{hash_key, Load, Picker, RING_HASH};

pub struct Target {
    pub backend: Arc<Backend>,
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
    /// Its slow start within this Service.
    pub ramp: Arc<Ramp>,
    /// "backend HOST:PORT (Service NS/NAME, pod POD)", for error messages.
    pub who: String,
    /// The Pod behind the endpoint, "" when unknown: what `x-weighbridge-endpoint` names.
    pub pod: String,
}

impl Target {
    /// Can take a call: connected or connectable, not ejected, not failing health checks.
    #[inline]
    pub fn available(&self) -> bool {
        !self.backend.is_down() && self.health.available()
    }

    /// (state, why) when it cannot take calls.
    pub fn unavailable(&self) -> Option<(&'static str, String)> {
        if let Some((state, why, _)) = self.health.state() {
            return Some((state, why));
        }
        let (_, why, down, _) = self.backend.status();
        down.then_some(("connect_failing", why))
    }
}

/// A Service's failover settings (docs/annotations.md).
pub struct Policy {
    pub retry: Option<RetryPolicy>,
    pub outlier: Option<OutlierPolicy>,
    /// Percent: when fewer of the endpoints can take calls, calls spread over all of them.
    pub panic_threshold: u32,
    /// A call on which nothing moved this long is ended; None: never.
    pub stream_idle_timeout: Option<Duration>,
    /// The request header ring_hash hashes; None: no hash key.
    pub hash_header: Option<http::HeaderName>,
    /// New endpoints and weight increases ramp up; None: at once.
    pub slow_start: Option<SlowStart>,
    pub debug: Debug,
}

/// What a Service lets its callers ask for while debugging (`weighbridge.io/debug`).
#[derive(Clone, Copy)]
pub struct Debug {
    /// A call carrying `x-weighbridge-debug: 1` gets response metadata naming its backend,
    /// pod, strategy, set and the reason for the pick.
    pub metadata: bool,
    /// A call carrying `x-weighbridge-endpoint: POD` goes to that pod.
    pub endpoint_override: bool,
}

pub struct Route {
    /// NAMESPACE/NAME
    pub key: String,
    /// The strategy's name, the set's generation and the etcd revision it was stored at, for
    /// debug metadata.
    pub strategy: String,
    pub generation: u64,
    pub revision: i64,
    pub targets: Vec<Target>,
    /// The targets' weights, for picks among a subset.
    pub weights: Vec<u32>,
    pub picker: Picker,
    /// Zone-aware routing or EndpointSlice hints; None: every zone alike.
    pub zones: Option<Zones>,
    pub policy: Policy,
    /// Per Service; they outlive set updates.
    pub budget: Arc<Budget>,
    pub counters: Arc<ServiceCounters>,
    /// This proxy's calls in flight on this route, for ring_hash's load bound.
    pub in_flight: AtomicI64,
}

/// What the load-aware strategies read: this proxy's calls in flight to each endpoint of the
/// Service, and their latency estimates.
impl Load for Route {
    #[inline]
    fn in_flight(&self, i: usize) -> u64 {
        self.targets[i].stats.in_flight.load(Relaxed).max(0) as u64
    }

    #[inline]
    fn total_in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed).max(0) as u64
    }

    #[inline]
    fn latency_ns(&self, i: usize) -> f64 {
        self.targets[i].stats.rtt.estimate_ns()
    }

    fn name(&self, i: usize) -> &str {
        &self.targets[i].backend.hostport
    }

    #[inline]
    fn available(&self, i: usize) -> bool {
        self.targets[i].available()
    }
}

impl Route {
    /// The endpoint for this call: the strategy's pick among the endpoints that can take it,
    /// avoiding `avoid` (where the call just failed) when another can. Skipping keeps each
    /// strategy's proportions among the rest (a rotation moves on, a random draw is drawn
    /// again). Below the panic threshold, the pick is the strategy's among all endpoints.
    /// With a zone plan, the first pick is the strategy's within the zone the plan draws; any
    /// other is among every zone.
    #[inline]
    pub fn pick(&self, avoid: Option<usize>, key: Option<u64>) -> Result<usize, String> {
        self.pick_with(avoid, key, None)
    }

    /// A pick as `pick` makes it, and why in the words of Explain: for calls that ask for
    /// debug metadata.
    pub fn pick_why(
        &self,
        avoid: Option<usize>,
        key: Option<u64>,
    ) -> Result<(usize, String), String> {
        let mut why = String::new();
        let i = self.pick_with(avoid, key, Some(&mut why))?;
        Ok((i, why))
    }

    #[inline]
    fn pick_with(
        &self,
        avoid: Option<usize>,
        key: Option<u64>,
        mut why: Option<&mut String>,
    ) -> Result<usize, String> {
        let group = self.zones.as_ref().and_then(Zones::group);
        let first = match (why.as_deref_mut(), group, &self.zones) {
            (None, Some(group), _) => Zones::pick(group, self, key)?,
            (None, None, _) => self.picker.pick(self, key)?,
            (Some(why), Some(group), Some(zones)) => {
                let (i, w) = zones.pick_why(group, self, key)?;
                *why = w;
                i
            }
            (Some(why), _, zones) => {
                let (i, w) = self.picker.pick_why(self, key)?;
                *why = match zones {
                    Some(zones) => format!("{}; {w}", zones.why()),
                    None => w,
                };
                i
            }
        };
        let admitted = self.admits(first);
        if Some(first) != avoid && admitted && self.targets[first].available() {
            if let Some(why) = why {
                if let Some(note) = self.ramp_note(first) {
                    why.push_str(&format!("; {note}"));
                }
            }
            return Ok(first); // the usual case: one pick, two loads
        }
        let n = self.targets.len();
        let available = self.targets.iter().filter(|t| t.available()).count();
        let panic = (available * 100) < (self.policy.panic_threshold as usize * n);
        let usable = |i: usize| Some(i) != avoid && (panic || self.targets[i].available());
        if let Some(why) = why.as_deref_mut() {
            self.skipped(why, first, avoid, admitted, panic);
        }
        if admitted && usable(first) {
            return Ok(first);
        }
        // A rotation reaches every endpoint within n picks; a weighted one almost surely. A
        // keyed pick (ring_hash) would pick the same again: straight to the draw below.
        for _ in 0..if key.is_some() { 0 } else { n.max(4) } {
            let i = self.picker.pick(self, key)?;
            if usable(i) && self.admits(i) {
                return Ok(i);
            }
        }
        // Rare (most of the weight cannot take calls): a weighted draw among those that can.
        let total: u64 = (0..n)
            .filter(|&i| usable(i))
            .map(|i| u64::from(self.weights[i]))
            .sum();
        if total > 0 {
            let mut draw = fastrand::u64(..total);
            for i in (0..n).filter(|&i| usable(i)) {
                match draw.checked_sub(u64::from(self.weights[i])) {
                    Some(rest) => draw = rest,
                    None => return Ok(i),
                }
            }
        }
        match avoid {
            // The only endpoint left is the one that just failed: better it than nothing.
            Some(i) if n == 1 || panic || self.targets[i].available() => {
                if let Some(why) = why {
                    why.push_str("; the only endpoint left is the one the last try failed on");
                }
                Ok(i)
            }
            _ => Err(self.none_available()),
        }
    }

    /// How many of `calls` picks went to each endpoint (by index), made as calls make them
    /// (`pick`: the strategy's state moves on, endpoints that cannot take calls are skipped)
    /// but with nothing sent and no counter changed: `wbctl simulate`. ring_hash's calls carry
    /// distinct keys (call i the hash of "i"), so its counts are the ring's share of keys.
    pub fn simulate(&self, calls: u64) -> Result<Vec<u64>, String> {
        let keyed = self.strategy == RING_HASH;
        let mut counts = vec![0; self.targets.len()];
        for call in 0..calls {
            let key = keyed.then(|| hash_key(call.to_string().as_bytes()));
            counts[self.pick(None, key)?] += 1;
        }
        Ok(counts)
    }

    /// Adds to `why` why the strategy's first pick `first` was passed over (a debug call's
    /// reason), in the words of Explain.
    fn skipped(
        &self,
        why: &mut String,
        first: usize,
        avoid: Option<usize>,
        admitted: bool,
        panic: bool,
    ) {
        let host = &self.targets[first].backend.hostport;
        if Some(first) == avoid {
            why.push_str(&format!(
                "; but the last try failed on {host}, so the call goes to another"
            ));
        } else if !admitted {
            why.push_str(&format!(
                "; but {host} is in slow start and sat this call out, so the call goes to another"
            ));
        } else if let Some(note) = self.unavailable_note(first) {
            if panic {
                why.push_str(&format!(
                    "; {note}, yet fewer than {}% of the endpoints can take calls (the panic \
                     threshold), so every endpoint does",
                    self.policy.panic_threshold
                ));
            } else {
                why.push_str(&format!(
                    "; {note}, so the call goes to one that can take it"
                ));
            }
        }
    }

    /// Why a call carrying `x-weighbridge-endpoint` went to endpoint `i`.
    pub fn forced_why(&self, i: usize) -> String {
        let why = format!(
            "forced by x-weighbridge-endpoint: pod {}",
            self.targets[i].pod
        );
        match self.unavailable_note(i) {
            Some(note) => format!("{why}; {note}, and a forced call goes to it anyway"),
            None => why,
        }
    }

    /// "in slow start, taking N% of its share" when endpoint `i` is ramping up.
    pub fn ramp_note(&self, i: usize) -> Option<String> {
        let target = &self.targets[i];
        let policy = self.policy.slow_start.as_ref()?;
        target.ramp.ramping().then(|| {
            format!(
                "in slow start, taking {:.0}% of its share",
                target.ramp.admitted(policy) * 100.0
            )
        })
    }

    /// "but HOST:PORT is STATE (REASON)" when endpoint `i` cannot take calls.
    pub fn unavailable_note(&self, i: usize) -> Option<String> {
        let target = &self.targets[i];
        let (state, reason) = target.unavailable()?;
        Some(format!(
            "but {} is {state} ({reason})",
            target.backend.hostport
        ))
    }

    /// The endpoint of pod `pod`, for a call carrying `x-weighbridge-endpoint`: (counter,
    /// gRPC status, message) when the Service does not allow that or has no such endpoint. A
    /// forced call goes to its endpoint whatever its state (ejected, unhealthy, in slow start):
    /// the caller asked for that pod, and a failure then names it.
    pub fn forced(&self, pod: &str) -> Result<usize, (LocalError, u32, String)> {
        if !self.policy.debug.endpoint_override {
            return Err((
                LocalError::EndpointOverrideDenied,
                grpc::FAILED_PRECONDITION,
                format!(
                    "Service {} does not allow x-weighbridge-endpoint; annotate it with \
                     weighbridge.io/debug: 'endpoint-override: on' to allow it",
                    self.key
                ),
            ));
        }
        if let Some(i) = self
            .targets
            .iter()
            .position(|t| !pod.is_empty() && t.pod == pod)
        {
            return Ok(i);
        }
        let mut pods: Vec<&str> = self
            .targets
            .iter()
            .map(|t| t.pod.as_str())
            .filter(|p| !p.is_empty())
            .take(10)
            .collect();
        if self.targets.len() > 10 {
            pods.push("…");
        }
        Err((
            LocalError::EndpointNotFound,
            grpc::NOT_FOUND,
            format!(
                "Service {} has no endpoint of pod {} that takes calls (serving, not \
                 terminating, weight > 0); its pods: {}",
                self.key,
                quoted(pod),
                if pods.is_empty() {
                    "none".to_string()
                } else {
                    pods.join(", ")
                }
            ),
        ))
    }

    /// (endpoint, why) of the next call's first pick, without changing the strategy's state
    /// (a zone plan and random strategies draw one to show).
    pub fn explain(&self, key: Option<u64>) -> Result<(usize, String), String> {
        match &self.zones {
            Some(zones) => match zones.group() {
                Some(group) => zones.explain(group, self, key),
                None => {
                    let (i, why) = self.picker.explain(self, key)?;
                    Ok((i, format!("{}; {why}", zones.why())))
                }
            },
            None => Ok(self.picker.explain(self, key)?),
        }
    }

    /// Whether a pick of endpoint `i` stands under slow start: always, unless it is ramping,
    /// then with the probability of the part of its share it takes now.
    #[inline]
    fn admits(&self, i: usize) -> bool {
        match &self.policy.slow_start {
            None => true,
            Some(policy) => {
                let part = self.targets[i].ramp.admitted(policy);
                part >= 1.0 || fastrand::f64() < part
            }
        }
    }

    /// Why no endpoint can take a call (below a panic threshold of 0).
    fn none_available(&self) -> String {
        let mut why: Vec<String> = self
            .targets
            .iter()
            .take(5)
            .map(|t| match t.unavailable() {
                Some((state, reason)) => format!("{} {state}: {reason}", t.backend.hostport),
                None => format!("{} healthy", t.backend.hostport),
            })
            .collect();
        if self.targets.len() > 5 {
            why.push(format!("and {} more", self.targets.len() - 5));
        }
        format!(
            "no endpoint of Service {} can take calls ({})",
            self.key,
            why.join("; ")
        )
    }

    /// (ejected, all) endpoints, for outlier detection's maximum share.
    pub fn ejected_share(&self) -> (usize, usize) {
        let ejected = self.targets.iter().filter(|t| t.health.ejected()).count();
        (ejected, self.targets.len())
    }
}

#[derive(Default)]
pub struct Table {
    routes: HashMap<String, Arc<Route>>,
    grpc_services: HashMap<String, String>,
}

/// `NAME.NAMESPACE` for `NAMESPACE/NAME`.
pub fn host_key(key: &str) -> String {
    match key.split_once('/') {
        Some((ns, name)) => format!("{name}.{ns}"),
        None => key.to_string(),
    }
}

/// The `NAME.NAMESPACE` part of an authority, if it has that form.
fn authority_host(authority: &str) -> Option<Cow<'_, str>> {
    let mut host = authority;
    if host.bytes().filter(|&b| b == b':').count() == 1 {
        host = &host[..host.find(':')?];
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        let lowered = host.to_ascii_lowercase();
        service_host(&lowered).map(|h| Cow::Owned(h.to_string()))
    } else {
        service_host(host).map(Cow::Borrowed) // the usual case: no allocation
    }
}

/// `NAME.NAMESPACE` from a lower-case host: trailing dots and the `.svc[.cluster.local]`
/// suffix dropped.
fn service_host(host: &str) -> Option<&str> {
    let host = host.trim_end_matches('.');
    let host = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    (host.bytes().filter(|&b| b == b'.').count() == 1).then_some(host)
}

/// `'text'` in single quotes, backslashes and quotes escaped.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl Table {
    pub fn insert(&mut self, route: Route) -> Option<Arc<Route>> {
        self.routes.insert(host_key(&route.key), Arc::new(route))
    }

    pub fn remove(&mut self, key: &str) -> Option<Arc<Route>> {
        self.routes.remove(&host_key(key))
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.values()
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Route>> {
        self.routes.get(&host_key(key))
    }

    /// gRPC service name → NAMESPACE/NAME of the Service that declares it.
    pub fn set_grpc_services(&mut self, table: HashMap<String, String>) {
        self.grpc_services = table
            .into_iter()
            .map(|(name, key)| (name, host_key(&key)))
            .collect();
    }

    /// The route of a call and how it matched ("authority" or "grpc-service"), or why none.
    pub fn route(&self, authority: &str, path: &str) -> Result<(Arc<Route>, &'static str), String> {
        let host = authority_host(authority);
        if let Some(route) = host.as_deref().and_then(|h| self.routes.get(h)) {
            return Ok((Arc::clone(route), "authority"));
        }
        let service = match path.strip_prefix('/') {
            Some(rest) => &rest[..rest.rfind('/').unwrap_or(0)],
            None => "",
        };
        if let Some(route) = self
            .grpc_services
            .get(service)
            .and_then(|k| self.routes.get(k))
        {
            return Ok((Arc::clone(route), "grpc-service"));
        }
        Err(match host {
            Some(h) => {
                let (name, ns) = h.split_once('.').unwrap_or((&h, ""));
                format!(
                    "no backend set for Service {ns}/{name} (authority {}); \
                     is the Service annotated with weighbridge.io/strategy?",
                    quoted(authority)
                )
            }
            None => format!(
                "no route for authority {} and gRPC service {}: use \
                 NAME.NAMESPACE[.svc[.cluster.local]] as the authority, or list the gRPC \
                 service in weighbridge.io/grpc-services",
                quoted(authority),
                quoted(service)
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Events;
    use crate::health::Owner;

    fn route(strategy: &str, weights: &[u32], panic_threshold: u32) -> Route {
        let counters = Arc::new(ServiceCounters::default());
        let targets = (0..weights.len())
            .map(|i| {
                let hostport = format!("10.0.0.{i}:80");
                Target {
                    backend: Backend::detached(&hostport),
                    stats: Arc::new(Stats::new(0)),
                    health: Arc::new(Health::new(Owner {
                        service: "ns/a".into(),
                        hostport: hostport.clone(),
                        events: Arc::new(Events::default()),
                        counters: Arc::clone(&counters),
                    })),
                    ramp: Arc::default(),
                    who: hostport,
                    pod: format!("pod-{i}"),
                }
            })
            .collect();
        Route {
            key: "ns/a".into(),
            strategy: strategy.into(),
            generation: 7,
            revision: 42,
            targets,
            weights: weights.to_vec(),
            picker: Picker::build(strategy, weights, &[], 0, 1.25, "empty".into()).unwrap(),
            zones: None,
            policy: Policy {
                retry: None,
                outlier: None,
                panic_threshold,
                stream_idle_timeout: None,
                hash_header: None,
                slow_start: None,
                debug: Debug {
                    metadata: true,
                    endpoint_override: false,
                },
            },
            budget: Arc::default(),
            counters,
            in_flight: AtomicI64::new(0),
        }
    }

    fn shares(r: &Route, picks: usize) -> Vec<usize> {
        let mut n = vec![0; r.targets.len()];
        for _ in 0..picks {
            n[r.pick(None, None).unwrap()] += 1;
        }
        n
    }

    #[test]
    fn picks_skip_endpoints_that_cannot_take_calls_and_keep_proportions() {
        let r = route("round_robin", &[1, 1, 1, 1], 50);
        r.targets[1].backend.set_down(true);
        assert_eq!(shares(&r, 300), [100, 0, 100, 100]);

        let r = route("weighted_round_robin", &[1, 2, 3, 4], 50);
        r.targets[3].backend.set_down(true);
        assert_eq!(shares(&r, 600), [100, 200, 300, 0], "1:2:3 among the rest");

        let r = route("weighted_random", &[1, 3, 6], 50);
        r.targets[2].backend.set_down(true);
        let n = shares(&r, 40_000);
        assert_eq!(n[2], 0);
        let ratio = n[1] as f64 / n[0] as f64;
        assert!((2.7..3.3).contains(&ratio), "{n:?}");
    }

    #[test]
    fn below_the_panic_threshold_every_endpoint_is_picked() {
        let r = route("round_robin", &[1, 1, 1], 50);
        r.targets[0].backend.set_down(true);
        r.targets[1].backend.set_down(true);
        assert_eq!(shares(&r, 300), [100, 100, 100], "1 of 3 is under 50%");
        let r = route("round_robin", &[1, 1, 1], 0);
        r.targets[0].backend.set_down(true);
        r.targets[1].backend.set_down(true);
        assert_eq!(shares(&r, 300), [0, 0, 300]);
        r.targets[2].backend.set_down(true);
        let e = r.pick(None, None).unwrap_err();
        assert!(
            e.starts_with(
                "no endpoint of Service ns/a can take calls (10.0.0.0:80 connect_failing"
            ),
            "{e}"
        );
    }

    #[test]
    fn simulate_counts_real_picks_and_sends_nothing() {
        let r = route("weighted_round_robin", &[9, 9, 2], 50);
        assert_eq!(
            r.simulate(2000).unwrap(),
            [900, 900, 200],
            "exact over whole periods"
        );
        assert!(r
            .targets
            .iter()
            .all(|t| t.stats.requests.load(Relaxed) == 0));

        let r = route("round_robin", &[1, 1, 1, 1], 50);
        r.targets[1].backend.set_down(true);
        assert_eq!(
            r.simulate(300).unwrap(),
            [100, 0, 100, 100],
            "skips as calls do"
        );

        let mut r = route("ring_hash", &[1, 3], 50);
        let keys = ["10.0.0.0:80".to_string(), "10.0.0.1:80".to_string()];
        r.picker = Picker::build("ring_hash", &[1, 3], &keys, 0, 1.25, "empty".into()).unwrap();
        let n = r.simulate(20_000).unwrap();
        assert_eq!(n.iter().sum::<u64>(), 20_000);
        assert_eq!(
            n,
            r.simulate(20_000).unwrap(),
            "the same keys land the same way"
        );
        assert!((0.15..0.35).contains(&(n[0] as f64 / 20_000.0)), "{n:?}");

        let r = route("round_robin", &[], 50);
        assert_eq!(r.simulate(0).unwrap(), Vec::<u64>::new());
        assert_eq!(r.simulate(1).unwrap_err(), "empty");
    }

    #[test]
    fn a_retry_avoids_the_endpoint_that_failed_unless_it_is_the_only_one() {
        let r = route("random", &[1, 1], 50);
        for _ in 0..50 {
            assert_eq!(r.pick(Some(0), None), Ok(1));
        }
        let r = route("random", &[1], 50);
        assert_eq!(r.pick(Some(0), None), Ok(0));
    }

    #[test]
    fn authority_forms() {
        for (authority, host) in [
            ("echo.default", Some("echo.default")),
            ("echo.default:8080", Some("echo.default")),
            ("Echo.Default.svc", Some("echo.default")),
            ("echo.default.svc.cluster.local.:443", Some("echo.default")),
            ("localhost:8080", None),
            ("a.b.c", None),
            ("[::1]:80", None),
        ] {
            assert_eq!(authority_host(authority).as_deref(), host, "{authority}");
        }
    }

    #[test]
    fn misses_explain_themselves() {
        let t = Table::default();
        let e = t
            .route("missing.default.svc", "/test.Echo/Unary")
            .err()
            .unwrap();
        assert!(
            e.starts_with(
                "no backend set for Service default/missing (authority 'missing.default.svc')"
            ),
            "{e}"
        );
        let e = t.route("localhost:8080", "/test.Echo/Unary").err().unwrap();
        assert!(
            e.starts_with("no route for authority 'localhost:8080' and gRPC service 'test.Echo'"),
            "{e}"
        );
    }

    #[test]
    fn a_zone_plan_keeps_calls_in_zone_and_an_unavailable_endpoint_spreads_its_share() {
        use crate::locality::{Locality, ZoneAware, Zones};
        let mut r = route("round_robin", &[1; 6], 50);
        let places: Vec<_> = ["a", "a", "a", "b", "b", "b"]
            .iter()
            .map(|z| (z.to_string(), vec![], vec![]))
            .collect();
        let locality = Locality {
            zone: "a".into(),
            node: String::new(),
            proxies: [("a".to_string(), 1), ("b".to_string(), 1)].into(),
        };
        let setting = ZoneAware {
            prefer: true,
            min_endpoints: 6,
            hints: true,
        };
        r.zones = Zones::new(setting, &places, &r.weights, &locality, |w| {
            Picker::build("round_robin", w, &[], 0, 1.25, String::new())
        })
        .unwrap();
        assert_eq!(
            shares(&r, 300),
            [100, 100, 100, 0, 0, 0],
            "a strict rotation in zone a"
        );
        r.targets[0].backend.set_down(true);
        let n = shares(&r, 3000);
        let (local, remote) = (n[1] + n[2], n[3] + n[4] + n[5]);
        assert_eq!(n[0], 0);
        // Zone a's two keep their 2/3 and each endpoint takes a fifth of the down one's third.
        assert!((2150..2450).contains(&local) && remote > 450, "{n:?}");
    }

    #[test]
    fn slow_start_gives_a_ramping_endpoint_its_part_of_the_share() {
        let mut r = route("weighted_random", &[1, 1], 0);
        let policy = SlowStart::from_arg((1000.0, 1.0, 25)).unwrap();
        r.policy.slow_start = Some(policy);
        r.targets[1].ramp.begin(0.0); // at the floor: 25% admitted
        let n = 40_000;
        let second = (0..n).filter(|_| r.pick(None, None) == Ok(1)).count() as f64 / n as f64;
        // Weight 1 × 0.25 against 1: a fifth.
        assert!((second - 0.2).abs() < 0.015, "{second}");
        // A rotation skips its turn three times in four.
        let mut rr = route("round_robin", &[1, 1, 1], 0);
        rr.policy.slow_start = Some(policy);
        rr.targets[2].ramp.begin(0.0);
        let third = (0..n).filter(|_| rr.pick(None, None) == Ok(2)).count() as f64 / n as f64;
        assert!(third < 0.15 && third > 0.05, "{third}");
    }

    #[test]
    fn a_forced_endpoint_needs_the_annotation_and_a_pod_of_the_set() {
        let mut r = route("round_robin", &[1, 1, 1], 50);
        let (_, code, e) = r.forced("pod-1").unwrap_err();
        assert_eq!(code, grpc::FAILED_PRECONDITION);
        assert!(
            e.starts_with("Service ns/a does not allow x-weighbridge-endpoint")
                && e.ends_with("weighbridge.io/debug: 'endpoint-override: on' to allow it"),
            "{e}"
        );
        r.policy.debug.endpoint_override = true;
        assert_eq!(r.forced("pod-1").map_err(|e| e.2), Ok(1));
        let (_, code, e) = r.forced("pod-9").unwrap_err();
        assert_eq!(code, grpc::NOT_FOUND);
        assert!(
            e.contains("has no endpoint of pod 'pod-9' that takes calls")
                && e.ends_with("its pods: pod-0, pod-1, pod-2"),
            "{e}"
        );
        assert_eq!(r.forced("").map_err(|e| e.1), Err(grpc::NOT_FOUND));
        // An endpoint that cannot take calls still gets a forced one, which says so.
        r.targets[1].backend.set_down(true);
        assert_eq!(r.forced("pod-1").map_err(|e| e.2), Ok(1));
        let why = r.forced_why(1);
        assert!(
            why.starts_with(
                "forced by x-weighbridge-endpoint: pod pod-1; but 10.0.0.1:80 is connect_failing"
            ) && why.ends_with("and a forced call goes to it anyway"),
            "{why}"
        );
    }

    #[test]
    fn a_debug_pick_says_why_in_the_words_of_explain() {
        let r = route("round_robin", &[1, 1, 1], 0);
        let (next, said) = r.explain(None).unwrap();
        let (i, why) = r.pick_why(None, None).unwrap();
        assert_eq!((i, &why), (next, &said));
        assert!(
            why.starts_with("round_robin: next in the rotation"),
            "{why}"
        );
        // The rotation's next cannot take calls: the pick moves on and says why.
        let down = (i + 1) % 3;
        r.targets[down].backend.set_down(true);
        let (j, why) = r.pick_why(None, None).unwrap();
        assert_ne!(j, down);
        assert!(
            why.contains(&format!("; but 10.0.0.{down}:80 is connect_failing"))
                && why.ends_with(", so the call goes to one that can take it"),
            "{why}"
        );
        // A retry passes over the endpoint its last try failed on.
        let r = route("round_robin", &[1, 1], 0);
        let (next, _) = r.explain(None).unwrap();
        let (j, why) = r.pick_why(Some(next), None).unwrap();
        assert_ne!(j, next);
        assert!(why.contains("but the last try failed on"), "{why}");
    }
}
