//! The failover state of one endpoint within one Service: outlier detection (passive: the
//! outcome of every try) and active gRPC health checks (`grpc.health.v1.Health/Check`).
//!
//! An endpoint that is ejected or failing its health checks is skipped by every strategy (see
//! `routing::Route::pick`). Ejection lasts base time × the times it was ejected lately, capped
//! by a maximum; at most a share of a Service's endpoints are ejected at once (at least one
//! may always be). The state outlives set updates, like the endpoint's counters.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use crate::events::{unix_now, Events};
use crate::grpc;
use crate::pool;
use crate::retry::ServiceCounters;
use crate::tls::ClientTls;

const EJECTED: u8 = 1;
const UNHEALTHY: u8 = 2;

pub struct OutlierPolicy {
    pub consecutive: u32,
    pub base: Duration,
    pub max: Duration,
    pub max_percent: u32,
}

/// (consecutive failures, base ejection s, max ejection s, max ejected percent)
pub type OutlierArg = (u32, f64, f64, u32);

impl OutlierPolicy {
    pub fn from_arg((consecutive, base, max, max_percent): OutlierArg) -> Result<Self, String> {
        let secs = |s: f64| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| "outlier detection: ejection times must be ≥ 0 s".to_string())
        };
        if consecutive == 0 || max_percent > 100 {
            return Err(
                "outlier detection: consecutive failures ≥ 1 and max ejected 0-100%".into(),
            );
        }
        Ok(OutlierPolicy {
            consecutive,
            base: secs(base)?,
            max: secs(max)?,
            max_percent,
        })
    }
}

#[derive(Clone, PartialEq)]
pub struct CheckPolicy {
    pub service: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy: u32,
    pub healthy: u32,
}

/// (service name, interval s, timeout s, unhealthy threshold, healthy threshold)
pub type CheckArg = (String, f64, f64, u32, u32);

impl CheckPolicy {
    pub fn from_arg(
        (service, interval, timeout, unhealthy, healthy): CheckArg,
    ) -> Result<Self, String> {
        let secs = |s: f64| {
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| "health check: interval and timeout must be > 0 s".to_string())
        };
        if unhealthy == 0 || healthy == 0 {
            return Err("health check: thresholds must be at least 1".into());
        }
        Ok(CheckPolicy {
            service,
            interval: secs(interval)?,
            timeout: secs(timeout)?,
            unhealthy,
            healthy,
        })
    }
}

struct Status {
    state: &'static str,
    reason: String,
    since: f64,
    /// Times ejected lately: the next ejection lasts base × (this + 1).
    level: u32,
    uneject_at: Option<Instant>,
    passes: u32,
    fails: u32,
}

/// Who this state belongs to, for events and counters.
pub struct Owner {
    pub service: String,
    pub hostport: String,
    pub events: Arc<Events>,
    pub counters: Arc<ServiceCounters>,
}

pub struct Health {
    flags: AtomicU8,
    consecutive: AtomicU32,
    ejections: AtomicU64,
    /// Bumped by every ejection, so that an old ejection's timer does not end a newer one.
    epoch: AtomicU64,
    status: Mutex<Status>,
    check: Mutex<Option<(CheckPolicy, Option<String>, AbortHandle)>>,
    owner: Owner,
}

impl Drop for Health {
    fn drop(&mut self) {
        self.stop_checks();
    }
}

impl Health {
    pub fn new(owner: Owner) -> Self {
        Health {
            flags: AtomicU8::new(0),
            consecutive: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            status: Mutex::new(Status {
                state: "healthy",
                reason: String::new(),
                since: unix_now(),
                level: 0,
                uneject_at: None,
                passes: 0,
                fails: 0,
            }),
            check: Mutex::new(None),
            owner,
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Neither ejected nor failing health checks.
    #[inline]
    pub fn available(&self) -> bool {
        self.flags.load(Relaxed) == 0
    }

    pub fn ejected(&self) -> bool {
        self.flags.load(Relaxed) & EJECTED != 0
    }

    /// (state, reason, since) when ejected or unhealthy; None when neither.
    pub fn state(&self) -> Option<(&'static str, String, f64)> {
        if self.available() {
            return None;
        }
        let s = self.status();
        Some((s.state, s.reason.clone(), s.since))
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Relaxed)
    }

    /// Changes the shown state and queues the event.
    fn transition(&self, s: &mut Status, state: &'static str, reason: String) {
        let o = &self.owner;
        o.events
            .push(&o.service, &o.hostport, state, reason.clone());
        s.state = state;
        s.reason = reason;
        s.since = unix_now();
    }

    /// A try succeeded (for outlier detection: anything but a connect failure, a reset, a lost
    /// connection, UNAVAILABLE or a per-try timeout).
    #[inline]
    pub fn succeeded(&self) {
        if self.consecutive.load(Relaxed) != 0 {
            self.consecutive.store(0, Relaxed);
        }
    }

    /// A try failed; `peers` counts the Service's endpoints (this one among them) as
    /// (ejected, all), to keep the ejected share under the policy's maximum.
    pub fn failed(
        self: &Arc<Self>,
        why: &str,
        policy: Option<&OutlierPolicy>,
        peers: impl FnOnce() -> (usize, usize),
    ) {
        let n = self.consecutive.fetch_add(1, Relaxed) + 1;
        let Some(policy) = policy else { return };
        if n < policy.consecutive || self.ejected() {
            return;
        }
        let (ejected, all) = peers();
        let allowed = (all * policy.max_percent as usize / 100).max(1);
        if ejected >= allowed {
            return;
        }
        let mut s = self.status();
        if self.ejected() {
            return; // another thread was first
        }
        // The level falls back to 0 once an endpoint has stayed in for the longest ejection.
        if s.uneject_at.is_some_and(|at| at.elapsed() > policy.max) {
            s.level = 0;
        }
        s.level += 1;
        let time = policy.base.saturating_mul(s.level).min(policy.max);
        self.flags.fetch_or(EJECTED, Relaxed);
        self.ejections.fetch_add(1, Relaxed);
        self.owner.counters.ejections.fetch_add(1, Relaxed);
        let epoch = self.epoch.fetch_add(1, Relaxed) + 1;
        self.transition(
            &mut s,
            "ejected",
            format!(
                "{n} consecutive failures, the last: {why}; ejected for {}s",
                time.as_secs_f64()
            ),
        );
        drop(s);
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            if let Some(me) = me.upgrade() {
                me.uneject(epoch, time);
            }
        });
    }

    fn uneject(&self, epoch: u64, time: Duration) {
        if self.epoch.load(Relaxed) != epoch {
            return;
        }
        let mut s = self.status();
        self.consecutive.store(0, Relaxed);
        s.uneject_at = Some(Instant::now());
        let flags = self.flags.fetch_and(!EJECTED, Relaxed) & !EJECTED;
        let (state, reason) = if flags & UNHEALTHY != 0 {
            ("unhealthy", "ejection over, but failing health checks")
        } else {
            ("healthy", "ejection over")
        };
        self.transition(
            &mut s,
            state,
            format!("{reason} (after {}s)", time.as_secs_f64()),
        );
    }

    /// A health check's result: Ok for SERVING, else why not.
    fn checked(&self, result: Result<(), String>, policy: &CheckPolicy) {
        let mut s = self.status();
        let unhealthy = self.flags.load(Relaxed) & UNHEALTHY != 0;
        match result {
            Ok(()) => {
                self.owner.counters.checks_passed.fetch_add(1, Relaxed);
                s.fails = 0;
                s.passes = s.passes.saturating_add(1);
                if unhealthy && s.passes >= policy.healthy {
                    let flags = self.flags.fetch_and(!UNHEALTHY, Relaxed) & !UNHEALTHY;
                    let state = if flags & EJECTED != 0 {
                        "ejected"
                    } else {
                        "healthy"
                    };
                    let reason = format!("{} health checks passed", s.passes);
                    self.transition(&mut s, state, reason);
                }
            }
            Err(why) => {
                self.owner.counters.checks_failed.fetch_add(1, Relaxed);
                s.passes = 0;
                s.fails = s.fails.saturating_add(1);
                if !unhealthy && s.fails >= policy.unhealthy {
                    self.flags.fetch_or(UNHEALTHY, Relaxed);
                    let reason = format!("{} health checks failed, the last: {why}", s.fails);
                    self.transition(&mut s, "unhealthy", reason);
                }
            }
        }
    }

    /// Runs `policy`'s health checks on `runtime`, over TLS when `tls` is given (None: stops
    /// them); a policy and TLS equal to the running ones keep their task, so set updates do not
    /// restart checks.
    pub fn set_checks(
        self: &Arc<Self>,
        policy: Option<&CheckPolicy>,
        runtime: &Handle,
        handshake: Duration,
        tls: Option<&Arc<ClientTls>>,
    ) {
        let mut check = self.check.lock().unwrap_or_else(|e| e.into_inner());
        let tls_key = tls.map(|t| t.key.clone());
        if check.as_ref().map(|(p, k, _)| (p, k)) == policy.map(|p| (p, &tls_key)) {
            return;
        }
        if let Some((_, _, task)) = check.take() {
            task.abort();
        }
        if policy.is_none() && self.flags.fetch_and(!UNHEALTHY, Relaxed) & UNHEALTHY != 0 {
            let mut s = self.status();
            self.transition(&mut s, "healthy", "health checks turned off".into());
        }
        if let Some(policy) = policy {
            let task = runtime.spawn(check_loop(
                Arc::downgrade(self),
                policy.clone(),
                handshake,
                tls.cloned(),
            ));
            *check = Some((policy.clone(), tls_key, task.abort_handle()));
        }
    }

    pub fn stop_checks(&self) {
        if let Some((_, _, task)) = self.check.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

async fn check_loop(
    health: Weak<Health>,
    policy: CheckPolicy,
    handshake: Duration,
    tls: Option<Arc<ClientTls>>,
) {
    let Some(hostport) = health.upgrade().map(|h| h.owner.hostport.clone()) else {
        return;
    };
    let mut conn: Option<h2::client::SendRequest<Bytes>> = None;
    loop {
        let result = match tokio::time::timeout(
            policy.timeout,
            check(
                &mut conn,
                &hostport,
                &policy.service,
                handshake,
                tls.as_deref(),
            ),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {}s",
                policy.timeout.as_secs_f64()
            )),
        };
        if result.is_err() {
            conn = None; // a fresh connection next time
        }
        match health.upgrade() {
            Some(h) => h.checked(result, &policy),
            None => return,
        }
        tokio::time::sleep(policy.interval.mul_f64(0.9 + 0.2 * fastrand::f64())).await;
    }
}

/// One `grpc.health.v1.Health/Check`: Ok when the answer is SERVING.
async fn check(
    conn: &mut Option<h2::client::SendRequest<Bytes>>,
    hostport: &str,
    service: &str,
    handshake: Duration,
    tls: Option<&ClientTls>,
) -> Result<(), String> {
    let request = || {
        http::Request::post(format!("http://{hostport}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("a valid request")
    };
    // A kept connection that takes no new stream (the backend sent GOAWAY, as when it limits
    // connection age, or it broke) says nothing about the backend: check on a fresh one.
    let kept = match conn.take() {
        Some(sender) => match sender.ready().await {
            Ok(mut ready) => ready
                .send_request(request(), false)
                .ok()
                .map(|s| (ready, s)),
            Err(_) => None,
        },
        None => None,
    };
    let (sender, (response, mut body)) = match kept {
        Some(sent) => sent,
        None => {
            let mut sender = pool::dial(hostport, handshake, tls, |_| {})
                .await?
                .0
                .ready()
                .await
                .map_err(|e| e.to_string())?;
            let sent = sender
                .send_request(request(), false)
                .map_err(|e| e.to_string())?;
            (sender, sent)
        }
    };
    *conn = Some(sender);
    // HealthCheckRequest { string service = 1; }, length-prefixed.
    let mut message = Vec::with_capacity(8 + service.len());
    if !service.is_empty() {
        message.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            message.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        message.push(n as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    body.send_data(Bytes::from(framed), true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    let (head, mut body) = response.into_parts();
    if grpc::status_of(&head.headers).is_some() {
        return Err(grpc::status_text(&head.headers).unwrap_or_default());
    }
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    match grpc::status_of(&trailers) {
        Some(b"0") => {}
        Some(_) => return Err(grpc::status_text(&trailers).unwrap_or_default()),
        None => return Err("no grpc-status in the answer".into()),
    }
    match serving_status(&data) {
        Some(1) => Ok(()),
        Some(2) => Err("NOT_SERVING".into()),
        Some(3) => Err("SERVICE_UNKNOWN".into()),
        Some(other) => Err(format!("status {other}")),
        None => Err("UNKNOWN".into()),
    }
}

/// `status` (field 1, varint) of a length-prefixed HealthCheckResponse; None when absent.
fn serving_status(framed: &[u8]) -> Option<u64> {
    let mut data = framed.get(5..)?;
    let mut status = None;
    while data.has_remaining() {
        let key = varint(&mut data)?;
        match key & 7 {
            0 => {
                let v = varint(&mut data)?;
                if key >> 3 == 1 {
                    status = Some(v);
                }
            }
            2 => {
                let len = usize::try_from(varint(&mut data)?).ok()?;
                if len > data.len() {
                    return None;
                }
                data.advance(len);
            }
            1 if data.len() >= 8 => data.advance(8),
            5 if data.len() >= 4 => data.advance(4),
            _ => return None,
        }
    }
    status
}

fn varint(data: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.first()?;
        data.advance(1);
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            service: "ns/a".into(),
            hostport: "10.0.0.1:80".into(),
            events: Arc::new(Events::default()),
            counters: Arc::new(ServiceCounters::default()),
        }
    }

    #[test]
    fn health_check_answers_are_parsed() {
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x01]), Some(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x02]), Some(2));
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 0]),
            None,
            "UNKNOWN is the default"
        );
        // An unknown length-delimited field before the status is skipped.
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 5, 0x12, 0x01, b'x', 0x08, 0x01]),
            Some(1)
        );
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 2, 0x12, 0x09]),
            None,
            "truncated"
        );
    }

    #[test]
    fn consecutive_failures_eject_within_the_share_and_time_ends_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let policy = OutlierPolicy::from_arg((3, 10.0, 25.0, 10)).unwrap();
            let hs: Vec<Arc<Health>> = (0..4).map(|_| Arc::new(Health::new(owner()))).collect();
            let peers = || (hs.iter().filter(|h| h.ejected()).count(), hs.len());
            for _ in 0..2 {
                hs[0].failed("reset", Some(&policy), peers);
            }
            hs[0].succeeded();
            for _ in 0..2 {
                hs[0].failed("reset", Some(&policy), peers);
            }
            assert!(
                hs[0].available(),
                "a success in between starts the count again"
            );
            hs[0].failed("reset", Some(&policy), peers);
            assert!(!hs[0].available());
            assert_eq!(hs[0].state().unwrap().0, "ejected");
            // 10% of 4 is 0, yet one may always be ejected, and only one.
            for _ in 0..5 {
                hs[1].failed("reset", Some(&policy), peers);
            }
            assert!(
                hs[1].available(),
                "the share of ejected endpoints is capped"
            );
            tokio::time::sleep(Duration::from_secs(11)).await;
            assert!(hs[0].available(), "back after base time");
            for _ in 0..3 {
                hs[0].failed("reset", Some(&policy), peers);
            }
            tokio::time::sleep(Duration::from_secs(11)).await;
            assert!(
                !hs[0].available(),
                "the second ejection lasts twice as long"
            );
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert!(hs[0].available());
            assert_eq!(hs[0].ejections(), 2);
            let states: Vec<&str> = hs[0].owner.events.drain().iter().map(|e| e.3).collect();
            assert_eq!(states, ["ejected", "healthy", "ejected", "healthy"]);
        });
    }

    #[test]
    fn health_checks_need_their_thresholds() {
        let h = Health::new(owner());
        let p = CheckPolicy::from_arg((String::new(), 1.0, 1.0, 2, 2)).unwrap();
        h.checked(Err("NOT_SERVING".into()), &p);
        assert!(h.available());
        h.checked(Err("NOT_SERVING".into()), &p);
        assert_eq!(h.state().unwrap().0, "unhealthy");
        h.checked(Ok(()), &p);
        assert!(!h.available());
        h.checked(Ok(()), &p);
        assert!(h.available());
    }
}
