//! State changes of endpoints and backend connections, queued for Python to log.
//!
//! The engine never logs itself: Python drains this queue (`Engine.events()`) and writes one
//! structured log line per change. The queue is bounded; when Python falls behind, the oldest
//! changes are dropped and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const CAPACITY: usize = 4096;

/// (unix time, Service key or "" for a connection-level change, HOST:PORT, state, reason)
pub type Event = (f64, String, String, &'static str, String);

#[derive(Default)]
pub struct Events {
    queue: Mutex<VecDeque<Event>>,
    pub dropped: AtomicU64,
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Events {
    pub fn push(&self, service: &str, hostport: &str, state: &'static str, reason: String) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() == CAPACITY {
            queue.pop_front();
            self.dropped.fetch_add(1, Relaxed);
        }
        queue.push_back((
            unix_now(),
            service.to_string(),
            hostport.to_string(),
            state,
            reason,
        ));
    }

    pub fn drain(&self) -> Vec<Event> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_changes_go_first_when_full() {
        let events = Events::default();
        for i in 0..CAPACITY + 3 {
            events.push("ns/a", &format!("10.0.0.1:{i}"), "healthy", String::new());
        }
        let drained = events.drain();
        assert_eq!(drained.len(), CAPACITY);
        assert_eq!(drained[0].2, "10.0.0.1:3");
        assert_eq!(events.dropped.load(Relaxed), 3);
        assert!(events.drain().is_empty());
    }
}
