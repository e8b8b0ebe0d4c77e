//! Backends: one HTTP/2 connection per endpoint, shared by all calls to it.
//!
//! An endpoint that leaves every backend set is drained: the pool forgets it, calls that picked
//! it finish on its connection, and the connection closes when the last of them lets go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tokio::runtime::Handle;

use crate::proxy::{CONNECTION_WINDOW, STREAM_WINDOW};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF: [Duration; 5] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

#[derive(Default)]
struct State {
    sender: Option<SendRequest<Bytes>>,
    last_error: String,
    failures: usize,
    failed_at: Option<Instant>,
}

pub struct Backend {
    pub hostport: String,
    state: Mutex<State>,
    connecting: tokio::sync::Mutex<()>,
    drained: AtomicBool,
}

impl Backend {
    fn new(hostport: String) -> Self {
        Backend {
            hostport,
            state: Mutex::new(State::default()),
            connecting: tokio::sync::Mutex::new(()),
            drained: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn connected(&self) -> bool {
        self.state().sender.is_some()
    }

    pub fn last_error(&self) -> String {
        self.state().last_error.clone()
    }

    /// A handle on the backend's connection, connecting first if there is none. While the
    /// backend is backing off after failed connects, fails at once with the last error.
    pub async fn sender(self: &Arc<Self>) -> Result<SendRequest<Bytes>, String> {
        if let Some(s) = &self.state().sender {
            return Ok(s.clone());
        }
        let _one_at_a_time = self.connecting.lock().await;
        {
            let st = self.state();
            if let Some(s) = &st.sender {
                return Ok(s.clone());
            }
            if let Some(at) = st.failed_at {
                let wait = BACKOFF[(st.failures - 1).min(BACKOFF.len() - 1)];
                if at.elapsed() < wait {
                    return Err(st.last_error.clone());
                }
            }
        }
        match self.connect().await {
            Ok(sender) => {
                let mut st = self.state();
                st.sender = Some(sender.clone());
                st.failures = 0;
                st.failed_at = None;
                st.last_error.clear();
                Ok(sender)
            }
            Err(e) => {
                let mut st = self.state();
                st.failures += 1;
                st.failed_at = Some(Instant::now());
                st.last_error = format!("cannot connect: {e}");
                Err(st.last_error.clone())
            }
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<SendRequest<Bytes>, String> {
        let tcp =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.hostport)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(io_message(&e)),
                Err(_) => return Err(format!("timed out after {}s", CONNECT_TIMEOUT.as_secs())),
            };
        tcp.set_nodelay(true).map_err(|e| io_message(&e))?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
        // Weak: the connection must not keep its backend alive, or a drained backend's
        // connection would never close (see `drain`).
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let result = connection.await;
            if let Some(me) = me.upgrade() {
                me.lost(match result {
                    Ok(()) => "connection closed".to_string(),
                    Err(e) => format!("connection lost: {e}"),
                });
            }
        });
        Ok(sender)
    }

    fn lost(&self, why: String) {
        let mut st = self.state();
        st.sender = None;
        if !self.drained.load(Relaxed) {
            st.last_error = why;
        }
    }

    /// Out of every set. Calls that picked it (even a moment ago, on another thread) still use
    /// its connection; once the last route and call holding the backend let go, the backend is
    /// dropped with its connection handle, and h2 closes the connection after its streams.
    fn drain(&self) {
        self.drained.store(true, Relaxed);
    }
}

/// "Connection refused", not "Connection refused (os error 111)".
fn io_message(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Endpoints by `host:port`, counted by the routes that use them.
pub struct Pool {
    backends: Mutex<HashMap<String, (Arc<Backend>, usize)>>,
    eager: bool,
    runtime: Handle,
}

impl Pool {
    pub fn new(eager: bool, runtime: Handle) -> Self {
        Pool {
            backends: Mutex::new(HashMap::new()),
            eager,
            runtime,
        }
    }

    pub fn acquire(&self, hostport: &str) -> Arc<Backend> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((backend, refs)) = map.get_mut(hostport) {
            *refs += 1;
            return Arc::clone(backend);
        }
        let backend = Arc::new(Backend::new(hostport.to_string()));
        map.insert(hostport.to_string(), (Arc::clone(&backend), 1));
        if self.eager {
            let warm = Arc::clone(&backend);
            self.runtime.spawn(async move {
                let _ = warm.sender().await;
            });
        }
        backend
    }

    pub fn release(&self, hostport: &str) {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((backend, refs)) = map.get_mut(hostport) {
            *refs -= 1;
            if *refs == 0 {
                backend.drain();
                map.remove(hostport);
            }
        }
    }

    pub fn status(&self) -> Vec<(String, bool, String)> {
        let map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .map(|(b, _)| (b.hostport.clone(), b.connected(), b.last_error()))
            .collect()
    }

    pub fn drain_all(&self) {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        for (b, _) in map.values() {
            b.drain();
        }
        map.clear();
    }
}
