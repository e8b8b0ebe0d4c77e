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

use crate::health::{Health, OutlierPolicy};
use crate::locality::Zones;
use crate::pool::Backend;
use crate::retry::{Budget, RetryPolicy, ServiceCounters};
use crate::slow_start::{Ramp, SlowStart};
use crate::stats::Stats;
use crate::strategy::{Load, Picker};

pub struct Target {
    pub backend: Arc<Backend>,
    pub stats: Arc<Stats>,
    pub health: Arc<Health>,
    /// Its slow start within this Service.
    pub ramp: Arc<Ramp>,
    /// "backend HOST:PORT (Service NS/NAME, pod POD)", for error messages.
    pub who: String,
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
}

pub struct Route {
    /// NAMESPACE/NAME
    pub key: String,
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
    pub fn pick(&self, avoid: Option<usize>, key: Option<u64>) -> Result<usize, String> {
        let first = match self.zones.as_ref().and_then(Zones::group) {
            Some(group) => Zones::pick(group, self, key)?,
            None => self.picker.pick(self, key)?,
        };
        let admitted = self.admits(first);
        if Some(first) != avoid && admitted && self.targets[first].available() {
            return Ok(first); // the usual case: one pick, two loads
        }
        let n = self.targets.len();
        let available = self.targets.iter().filter(|t| t.available()).count();
        let panic = (available * 100) < (self.policy.panic_threshold as usize * n);
        let usable = |i: usize| Some(i) != avoid && (panic || self.targets[i].available());
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
            Some(i) if n == 1 || panic || self.targets[i].available() => Ok(i),
            _ => Err(self.none_available()),
        }
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
                }
            })
            .collect();
        Route {
            key: "ns/a".into(),
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
}
