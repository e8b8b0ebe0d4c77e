//! Zone-aware routing: which zone's endpoints a call is kept to.
//!
//! Two sources decide, in this order (docs/annotations.md, `weighbridge.io/zone-aware`):
//!
//! 1. **EndpointSlice hints**, where the cluster set them (a Service with
//!    `trafficDistribution` or `service.kubernetes.io/topology-mode: Auto`): as kube-proxy
//!    does, when every endpoint carries node hints and some are for this proxy's node, calls go
//!    to those; else when every endpoint carries zone hints and some are for this proxy's zone,
//!    to those. The cluster did the balancing when it assigned the hints.
//! 2. **Envoy's zone-aware routing** (opt-in): with `u_z` the share of the set's weight in
//!    zone `z` and `p_z` the share of the proxies in it, a proxy in zone `L` keeps every call in
//!    `L` when `u_L ≥ p_L` (its zone's endpoints can carry its zone's calls); otherwise it keeps
//!    `u_L / p_L` of them and spills the rest to the other zones in proportion to their residual
//!    capacity `max(0, u_z − p_z)`. So that a few endpoints are not swamped, it applies only
//!    from `min-endpoints` endpoints on, and only when this proxy's zone, the proxies' spread
//!    and an endpoint in this zone are all known.
//!
//! A plan is computed when a set is applied and again whenever the proxies' spread changes
//! (`Engine.set_proxy_zones`); a pick reads it with one atomic load per group. Each group has
//! its own picker of the Service's strategy over its endpoints, so a rotation stays a strict
//! rotation within the zone. A pick whose endpoint cannot take the call falls back to the
//! Service's picker over every zone, so an ejection in this zone spreads its share instead of
//! piling it onto this zone's survivors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Mutex;

use crate::strategy::{Load, Picker};

/// Where this proxy runs (empty: unknown), and how the proxies spread over zones.
#[derive(Clone, Default)]
pub struct Locality {
    pub zone: String,
    pub node: String,
    /// Live proxies per zone, this one included.
    pub proxies: BTreeMap<String, u32>,
}

/// A Service's `weighbridge.io/zone-aware`, resolved (its defaults live in Python).
#[derive(Clone, Copy, Debug)]
pub struct ZoneAware {
    /// Envoy's zone-aware routing.
    pub prefer: bool,
    /// Zone preference applies from this many endpoints on.
    pub min_endpoints: usize,
    /// Follow EndpointSlice hints.
    pub hints: bool,
}

/// Where an endpoint is: (zone, zones hinted, nodes hinted), as Python hands it over.
pub type PlaceArg = (String, Vec<String>, Vec<String>);

/// Endpoints a call can be kept to, and its picker over them.
pub struct Group {
    pub name: String,
    pub members: Vec<usize>,
    pub picker: Picker,
    weight: u64,
}

/// The zone plan of one Service's route.
pub struct Zones {
    setting: ZoneAware,
    /// One group per zone with endpoints (by name), then the hinted endpoints, if any.
    groups: Vec<Group>,
    /// Index of the hinted group in `groups`, and why it holds what it holds.
    hinted: Option<(usize, String)>,
    total_weight: u64,
    endpoints: usize,
    /// Cumulative share of calls per group, in units of 2^-32 (u32::MAX: the rest); read
    /// only while `active`.
    thresholds: Vec<AtomicU32>,
    active: AtomicBool,
    /// The plan in words, for Explain and the admin API.
    why: Mutex<String>,
}

/// The picks of one group: the Service's load seen through the group's member indices.
struct Subset<'a> {
    load: &'a dyn Load,
    members: &'a [usize],
}

impl Load for Subset<'_> {
    fn in_flight(&self, i: usize) -> u64 {
        self.load.in_flight(self.members[i])
    }
    fn total_in_flight(&self) -> u64 {
        self.members.iter().map(|&m| self.load.in_flight(m)).sum()
    }
    fn latency_ns(&self, i: usize) -> f64 {
        self.load.latency_ns(self.members[i])
    }
    fn name(&self, i: usize) -> &str {
        self.load.name(self.members[i])
    }
    fn available(&self, i: usize) -> bool {
        self.load.available(self.members[i])
    }
}

/// (group, share of calls), and the plan in words.
type Plan = (Vec<(usize, f64)>, String);

impl Zones {
    /// The groups of a set's eligible endpoints (`weights`, `places` in the same order);
    /// `picker` builds the strategy's picker over a subset's weights. None when there is
    /// nothing to follow (no zone preference asked, no hints for this proxy).
    pub fn new(
        setting: ZoneAware,
        places: &[PlaceArg],
        weights: &[u32],
        locality: &Locality,
        picker: impl Fn(&[u32]) -> Result<Picker, String>,
    ) -> Result<Option<Self>, String> {
        if !setting.prefer && !setting.hints {
            return Ok(None);
        }
        if places.len() != weights.len() {
            return Err(format!(
                "{} endpoint places for {} endpoints",
                places.len(),
                weights.len()
            ));
        }
        let group = |name: String, members: Vec<usize>| -> Result<Group, String> {
            let w: Vec<u32> = members.iter().map(|&i| weights[i]).collect();
            Ok(Group {
                name,
                weight: w.iter().map(|&x| u64::from(x)).sum(),
                picker: picker(&w)?,
                members,
            })
        };
        let mut by_zone: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (zone, _, _)) in places.iter().enumerate() {
            if !zone.is_empty() {
                by_zone.entry(zone).or_default().push(i);
            }
        }
        let mut groups = Vec::with_capacity(by_zone.len() + 1);
        if setting.prefer {
            for (zone, members) in by_zone {
                groups.push(group(zone.to_string(), members)?);
            }
        }
        let mut hinted = None;
        if setting.hints {
            if let Some((name, members, why)) = hinted_members(places, locality) {
                hinted = Some((groups.len(), why));
                groups.push(group(name, members)?);
            }
        }
        if !setting.prefer && hinted.is_none() {
            return Ok(None); // nothing to follow: every zone alike
        }
        let zones = Zones {
            setting,
            thresholds: groups.iter().map(|_| AtomicU32::new(0)).collect(),
            groups,
            hinted,
            total_weight: weights.iter().map(|&w| u64::from(w)).sum(),
            endpoints: weights.len(),
            active: AtomicBool::new(false),
            why: Mutex::new(String::new()),
        };
        zones.replan(locality);
        Ok(Some(zones))
    }

    /// Recomputes the plan for the proxies' spread now.
    pub fn replan(&self, locality: &Locality) {
        let (shares, why) = self.plan(locality);
        // Cumulative in group order, so that a draw finds its group with one scan.
        let mut share = vec![0.0; self.groups.len()];
        for &(g, s) in &shares {
            share[g] = s;
        }
        let last = share.iter().rposition(|&s| s > 0.0);
        let mut cumulative = 0.0;
        for (g, t) in self.thresholds.iter().enumerate() {
            cumulative += share[g];
            let value = match last {
                Some(l) if g == l => u32::MAX,
                Some(l) if g < l => (cumulative * f64::from(u32::MAX)).round() as u32,
                _ => 0,
            };
            t.store(value, Relaxed);
        }
        self.active.store(!shares.is_empty(), Relaxed);
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    fn plan(&self, locality: &Locality) -> Plan {
        if let Some((g, why)) = &self.hinted {
            return (vec![(*g, 1.0)], why.clone());
        }
        let off = |why: String| (Vec::new(), format!("zone-aware routing off: {why}"));
        let me = &locality.zone;
        if me.is_empty() {
            return off("this proxy's zone is unknown (--zone)".into());
        }
        if self.endpoints < self.setting.min_endpoints {
            return off(format!(
                "{} endpoints, fewer than min-endpoints {}",
                self.endpoints, self.setting.min_endpoints
            ));
        }
        let zones = &self.groups[..self.hinted.as_ref().map_or(self.groups.len(), |h| h.0)];
        let Some(local) = zones.iter().position(|g| &g.name == me) else {
            return off(format!("no endpoint in this proxy's zone {me}"));
        };
        let proxies: u32 = locality.proxies.values().sum();
        let here = locality.proxies.get(me).copied().unwrap_or(0);
        if here == 0 {
            return off("the proxies' spread over zones is not known yet".into());
        }
        let upstream = |g: &Group| g.weight as f64 / self.total_weight as f64;
        let downstream = |zone: &str| {
            f64::from(locality.proxies.get(zone).copied().unwrap_or(0)) / f64::from(proxies)
        };
        let (u_local, p_local) = (upstream(&zones[local]), downstream(me));
        if u_local >= p_local {
            return (
                vec![(local, 1.0)],
                format!(
                    "every call kept in zone {me}: it holds {:.0}% of the endpoints' weight \
                     for {:.0}% of the proxies",
                    u_local * 100.0,
                    p_local * 100.0
                ),
            );
        }
        let keep = u_local / p_local;
        let residual: Vec<(usize, f64)> = zones
            .iter()
            .enumerate()
            .filter(|&(g, _)| g != local)
            .map(|(g, z)| (g, (upstream(z) - downstream(&z.name)).max(0.0)))
            .filter(|&(_, r)| r > 0.0)
            .collect();
        let spare: f64 = residual.iter().map(|(_, r)| r).sum();
        let mut shares = vec![(local, keep)];
        shares.extend(residual.iter().map(|&(g, r)| (g, (1.0 - keep) * r / spare)));
        let spill: Vec<String> = shares[1..]
            .iter()
            .map(|&(g, s)| format!("{:.0}% to {}", s * 100.0, zones[g].name))
            .collect();
        let why = format!(
            "{:.0}% of calls kept in zone {me} ({:.0}% of the endpoints' weight for {:.0}% of \
             the proxies), {}",
            keep * 100.0,
            u_local * 100.0,
            p_local * 100.0,
            spill.join(", ")
        );
        (shares, why)
    }

    /// The group for this call, or None when the plan keeps calls to no zone.
    #[inline]
    pub fn group(&self) -> Option<&Group> {
        if !self.active.load(Relaxed) {
            return None;
        }
        let draw = fastrand::u32(..);
        self.thresholds
            .iter()
            .position(|t| draw < t.load(Relaxed))
            .map(|g| &self.groups[g])
    }

    /// The pick of `group`'s picker, as an index among the Service's endpoints.
    #[inline]
    pub fn pick(group: &Group, load: &dyn Load, key: Option<u64>) -> Result<usize, String> {
        let subset = Subset {
            load,
            members: &group.members,
        };
        group
            .picker
            .pick(&subset, key)
            .map(|j| group.members[j])
            .map_err(str::to_string)
    }

    /// A pick of `group`'s picker and why, in the words of `explain`.
    pub fn pick_why(
        &self,
        group: &Group,
        load: &dyn Load,
        key: Option<u64>,
    ) -> Result<(usize, String), String> {
        let subset = Subset {
            load,
            members: &group.members,
        };
        let (j, why) = group
            .picker
            .pick_why(&subset, key)
            .map_err(str::to_string)?;
        Ok((group.members[j], format!("{}; {why}", self.why())))
    }

    /// (endpoint, why) of `group`'s next pick, without changing its state.
    pub fn explain(
        &self,
        group: &Group,
        load: &dyn Load,
        key: Option<u64>,
    ) -> Result<(usize, String), String> {
        let subset = Subset {
            load,
            members: &group.members,
        };
        let (j, why) = group.picker.explain(&subset, key).map_err(str::to_string)?;
        Ok((group.members[j], format!("{}; {why}", self.why())))
    }

    /// The plan in words.
    pub fn why(&self) -> String {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// (group name, members, why) of the endpoints hinted for this proxy, as kube-proxy chooses
/// them: node hints when every endpoint has some and some name this node, else zone hints when
/// every endpoint has some and some name this zone; None when neither applies.
fn hinted_members(
    places: &[PlaceArg],
    locality: &Locality,
) -> Option<(String, Vec<usize>, String)> {
    let pick = |mine: &str, hints: &dyn Fn(&PlaceArg) -> &Vec<String>, what: &str| {
        if mine.is_empty() || places.is_empty() || places.iter().any(|p| hints(p).is_empty()) {
            return None;
        }
        let members: Vec<usize> = (0..places.len())
            .filter(|&i| hints(&places[i]).iter().any(|h| h == mine))
            .collect();
        (!members.is_empty()).then(|| {
            let why = format!(
                "EndpointSlice hints: {} of {} endpoints are for this proxy's {what} {mine}",
                members.len(),
                places.len()
            );
            (format!("hinted for {what} {mine}"), members, why)
        })
    };
    pick(&locality.node, &|p| &p.2, "node").or_else(|| pick(&locality.zone, &|p| &p.1, "zone"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Picker;

    fn places(zones: &[&str]) -> Vec<PlaceArg> {
        zones
            .iter()
            .map(|z| (z.to_string(), vec![], vec![]))
            .collect()
    }

    fn locality(zone: &str, proxies: &[(&str, u32)]) -> Locality {
        Locality {
            zone: zone.into(),
            node: String::new(),
            proxies: proxies.iter().map(|(z, n)| (z.to_string(), *n)).collect(),
        }
    }

    const PREFER: ZoneAware = ZoneAware {
        prefer: true,
        min_endpoints: 6,
        hints: true,
    };

    fn zones(setting: ZoneAware, places: &[PlaceArg], weights: &[u32], l: &Locality) -> Zones {
        Zones::new(setting, places, weights, l, |w| {
            Picker::build("weighted_random", w, &[], 0, 1.25, "empty".into())
        })
        .unwrap()
        .unwrap()
    }

    /// Share of 40,000 draws per group name.
    fn shares(z: &Zones) -> BTreeMap<String, f64> {
        let mut n: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..40_000 {
            let name = z.group().map_or("-".to_string(), |g| g.name.clone());
            *n.entry(name).or_default() += 1;
        }
        n.into_iter()
            .map(|(k, v)| (k, f64::from(v) / 40_000.0))
            .collect()
    }

    #[test]
    fn a_zone_that_can_carry_its_proxies_keeps_every_call() {
        let p = places(&["a", "a", "a", "b", "b", "b"]);
        let z = zones(PREFER, &p, &[1; 6], &locality("a", &[("a", 1), ("b", 1)]));
        assert_eq!(shares(&z).get("a").copied(), Some(1.0));
        assert!(
            z.why().starts_with("every call kept in zone a"),
            "{}",
            z.why()
        );
    }

    #[test]
    fn a_zone_short_of_capacity_spills_by_residual_capacity() {
        // Zone a: 1/3 of the weight for 1/2 of the proxies keeps 2/3 of its calls; zone b
        // (residual 5/9 - 1/2) and zone c (1/9 - 0) share the rest 1:2.
        let p = places(&["a", "a", "b", "b", "b", "b", "c", "c", "c"]);
        let w = [6, 6, 5, 5, 5, 5, 1, 1, 2];
        let l = locality("a", &[("a", 2), ("b", 2)]);
        let z = zones(PREFER, &p, &w, &l);
        let s = shares(&z);
        let expect = [("a", 2.0 / 3.0), ("b", 1.0 / 9.0), ("c", 2.0 / 9.0)];
        for (zone, share) in expect {
            assert!((s[zone] - share).abs() < 0.012, "{zone}: {s:?}");
        }
        assert!(
            z.why().starts_with("67% of calls kept in zone a"),
            "{}",
            z.why()
        );
        // The proxies' spread changes: now zone a can carry its proxies.
        z.replan(&locality("a", &[("a", 1), ("b", 3)]));
        assert_eq!(shares(&z).get("a").copied(), Some(1.0));
    }

    #[test]
    fn zone_preference_needs_its_conditions() {
        let p = places(&["a", "a", "b", "b", "b", "b"]);
        let both = [("a", 1), ("b", 1)];
        for (l, endpoints, why) in [
            (locality("", &both), 6, "this proxy's zone is unknown"),
            (
                locality("a", &[]),
                6,
                "the proxies' spread over zones is not known",
            ),
            (
                locality("c", &both),
                6,
                "no endpoint in this proxy's zone c",
            ),
            (
                locality("a", &both),
                5,
                "5 endpoints, fewer than min-endpoints 6",
            ),
        ] {
            let z = zones(PREFER, &p[..endpoints], &vec![1; endpoints], &l);
            assert_eq!(shares(&z).get("-").copied(), Some(1.0), "{why}");
            assert!(z.why().contains(why), "{}", z.why());
        }
    }

    #[test]
    fn hints_choose_like_kube_proxy() {
        let hint = |zone: &str, zones: &[&str], nodes: &[&str]| -> PlaceArg {
            (
                zone.into(),
                zones.iter().map(|s| s.to_string()).collect(),
                nodes.iter().map(|s| s.to_string()).collect(),
            )
        };
        let mut l = locality("a", &[]);
        l.node = "n1".into();
        let off = ZoneAware {
            prefer: false,
            min_endpoints: 6,
            hints: true,
        };
        // Zone hints on every endpoint: those for zone a (one of them a zone-b endpoint the
        // cluster lent to zone a).
        let p = vec![
            hint("a", &["a"], &[]),
            hint("b", &["b"], &[]),
            hint("b", &["a"], &[]),
        ];
        let z = zones(off, &p, &[1, 1, 1], &l);
        let g = z.group().unwrap();
        assert_eq!(g.members, [0, 2]);
        assert!(
            z.why().starts_with("EndpointSlice hints: 2 of 3"),
            "{}",
            z.why()
        );
        // Node hints on every endpoint win over zone hints.
        let p = vec![hint("a", &["a"], &["n1"]), hint("a", &["a"], &["n2"])];
        assert_eq!(zones(off, &p, &[1, 1], &l).group().unwrap().members, [0]);
        // An endpoint without hints: none are followed, as kube-proxy does; and with hints for
        // other zones only, none either. Without zone preference there is then no plan.
        let none = |p: &[PlaceArg], w: &[u32]| {
            Zones::new(off, p, w, &l, |w| {
                Picker::build("random", w, &[], 0, 1.25, String::new())
            })
            .unwrap()
            .is_none()
        };
        assert!(none(
            &[hint("a", &["a"], &[]), hint("b", &[], &[])],
            &[1, 1]
        ));
        assert!(none(&[hint("b", &["b"], &[])], &[1]));
    }

    #[test]
    fn a_group_picks_among_its_members_only() {
        struct Idle;
        impl Load for Idle {
            fn in_flight(&self, _: usize) -> u64 {
                0
            }
            fn total_in_flight(&self) -> u64 {
                0
            }
            fn latency_ns(&self, _: usize) -> f64 {
                0.0
            }
            fn name(&self, _: usize) -> &str {
                "x"
            }
        }
        let p = places(&["b", "a", "b", "a", "a", "b"]);
        let z = zones(PREFER, &p, &[1; 6], &locality("a", &[("a", 1), ("b", 1)]));
        for _ in 0..100 {
            let g = z.group().unwrap();
            let i = Zones::pick(g, &Idle, None).unwrap();
            assert!([1, 3, 4].contains(&i), "{i}");
        }
    }
}
