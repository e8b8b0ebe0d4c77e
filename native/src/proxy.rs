//! Carrying calls: one client HTTP/2 stream ↔ one backend HTTP/2 stream, data as it comes.
//!
//! Each direction is a pipe that forwards DATA within the receiver's flow-control window and
//! returns window to the sender only once the bytes have left, so a slow reader slows its
//! writer instead of filling the proxy's memory. Headers and trailers pass unchanged, and so do
//! the backend's status and details. Errors the proxy produces itself are gRPC statuses whose
//! message starts with `weighbridge:` and names the route or backend concerned.
//!
//! Request headers under `x-weighbridge-` are the proxy's own and never reach a backend: a call
//! carrying `x-weighbridge-debug: 1` gets debug metadata (`DebugReply`) in its response
//! headers, and one carrying `x-weighbridge-endpoint: POD` goes to that pod when its Service
//! allows it (`Route::forced`). docs/annotations.md (`weighbridge.io/debug`) says what users
//! see.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::engine::Shared;
use crate::grpc::{self, Meter};
use crate::limits::{self, Activity, Limit, PREMATURE_RESET_WITHIN};
use crate::pool::Stream;
use crate::retry::{self, RetryPolicy};
use crate::routing::{Route, Target};
use crate::stats::{LocalError, TlsFailure};
use crate::strategy::hash_key;
use crate::workers::{self, WorkerCounters};

pub const STREAM_WINDOW: u32 = 1 << 20;
/// 8 MiB, not 16: 1 MiB messages moved at least as fast with less memory (docs/performance.md).
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// After a connection is refused (a bad preface, say), what the client sent is read and
/// dropped for at most this long and this many bytes, so that closing the socket sends FIN
/// (the client reads the end of the connection) rather than RST over unread data.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 << 10;

/// Accepts client connections on this thread until told to stop.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => {
                    let open = &shared.limit_counters.connections;
                    if open.fetch_add(1, Relaxed) >= shared.limits.max_connections {
                        // Full: closed at once, so the socket costs nothing while it waits.
                        open.fetch_sub(1, Relaxed);
                        shared.limit_counters.hit(Limit::MaxConnections);
                        drop(sock);
                        continue;
                    }
                    tokio::spawn(serve_socket(Arc::clone(&shared), sock, stop.clone()));
                }
                // Out of file descriptors and the like: pause rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            _ = stop.changed() => return,
        }
    }
}

/// Counts a client connection open, on its thread and on the proxy, for as long as it lives.
struct Open<'a>(&'a Shared, &'a WorkerCounters);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.1.open.fetch_sub(1, Relaxed);
        self.0.limit_counters.connections.fetch_sub(1, Relaxed);
    }
}

/// When a connection accepted now reaches its maximum age: `age` ± 10%, so that connections
/// opened together do not all go away together.
fn age_deadline(age: Option<Duration>) -> Option<tokio::time::Instant> {
    age.map(|age| tokio::time::Instant::now() + age.mul_f64(0.9 + 0.2 * fastrand::f64()))
}

/// The first byte of a TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// One accepted socket: TLS when the port serves TLS (plaintext h2c too if allowed, told apart
/// by the first byte), then HTTP/2. The TLS handshake and the HTTP/2 preface together must
/// come within the handshake timeout.
async fn serve_socket(shared: Arc<Shared>, mut sock: TcpStream, stop: watch::Receiver<bool>) {
    let counters = &shared.workers[workers::current()];
    counters.connections.fetch_add(1, Relaxed);
    counters.open.fetch_add(1, Relaxed);
    let _open = Open(&shared, counters);
    let _ = sock.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + shared.limits.handshake_timeout;
    let Some(tls) = shared.tls.as_ref() else {
        return serve_connection(&shared, &mut sock, deadline, stop).await;
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, sock.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
        Ok(Ok(1)) if tls.allow_h2c => {
            return serve_connection(&shared, &mut sock, deadline, stop).await
        }
        Ok(Ok(1)) => return shared.counters.tls_failed(TlsFailure::Plaintext),
        Ok(_) => return shared.counters.tls_failed(TlsFailure::NoHandshake),
        Err(_) => return shared.limit_counters.hit(Limit::HandshakeTimeout),
    }
    let acceptor = tls.acceptor();
    match tokio::time::timeout_at(deadline, acceptor.accept(sock)).await {
        Ok(Ok(mut stream)) => serve_connection(&shared, &mut stream, deadline, stop).await,
        Ok(Err(_)) => shared.counters.tls_failed(TlsFailure::HandshakeFailed),
        Err(_) => shared.limit_counters.hit(Limit::HandshakeTimeout),
    }
}

/// HTTP/2 on `io` until the connection ends. `io` is borrowed so that a connection refused
/// before HTTP/2 begins can still be closed cleanly.
async fn serve_connection<T>(
    shared: &Arc<Shared>,
    io: &mut T,
    deadline: tokio::time::Instant,
    mut stop: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &shared.limits;
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .handshake::<_, Bytes>(&mut *io);
    let mut conn = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(conn)) => conn,
        failed => {
            let timed_out = failed.is_err();
            drop(failed); // gives `io` back
            if timed_out {
                return shared.limit_counters.hit(Limit::HandshakeTimeout);
            }
            // Not HTTP/2 (a bad preface): end the connection with FIN, as RFC 9113 § 3.4 asks.
            shared.limit_counters.hit(Limit::InvalidPreface);
            return linger(io).await;
        }
    };
    let state = Arc::new(limits::Connection::new());
    let mut pings = limits.keepalive_time.and(conn.ping_pong());
    let mut ping_at = limits
        .keepalive_time
        .map(|t| tokio::time::Instant::now() + t);
    let mut pong_by: Option<tokio::time::Instant> = None;
    let mut idle_at = limits.idle_timeout.and_then(|t| state.idle_deadline(t));
    // The next stream id the client may open: ids skipped were answered by h2 itself.
    let mut next_id: u32 = 1;
    let mut stopping = false;
    let old_at = age_deadline(shared.max_connection_age);
    loop {
        if !stopping && *stop.borrow_and_update() {
            stopping = true;
            conn.graceful_shutdown(); // GOAWAY: no new streams, open ones finish
        }
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    let id: u32 = respond.stream_id().into();
                    if id > next_id {
                        shared.limit_counters.add(Limit::StreamsRefused, u64::from((id - next_id) / 2));
                    }
                    next_id = id.saturating_add(2);
                    if !stopping && state.rapid_reset() {
                        stopping = true;
                        shared.limit_counters.hit(Limit::RapidReset);
                        conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                        continue;
                    }
                    counters_for(shared).calls.fetch_add(1, Relaxed);
                    tokio::spawn(call(Arc::clone(shared), Arc::clone(&state), request, respond));
                }
                Some(Err(e)) => {
                    if e.is_library() || !e.is_remote() {
                        let limit = match e.reason() {
                            Some(Reason::ENHANCE_YOUR_CALM) => Some(Limit::Flood),
                            Some(Reason::NO_ERROR) | None => None,
                            Some(_) => Some(Limit::ProtocolError),
                        };
                        if let Some(limit) = limit {
                            shared.limit_counters.hit(limit);
                        }
                    }
                    return;
                }
                None => return,
            },
            changed = stop.changed(), if !stopping => {
                if changed.is_err() {
                    // The engine is gone without a word: shut down as if told to.
                    stopping = true;
                    conn.graceful_shutdown();
                }
            }
            // Old enough: GOAWAY, so the client reconnects (and may land on another thread
            // or proxy); its streams in flight finish here.
            () = sleep_until_or_never(old_at), if !stopping => {
                stopping = true;
                conn.graceful_shutdown();
            }
            // Without calls for the idle timeout: GOAWAY (checked again if calls came since).
            () = sleep_until_or_never(idle_at), if !stopping && idle_at.is_some() => {
                let idle = limits.idle_timeout.expect("idle timer set");
                match state.idle_deadline(idle) {
                    Some(at) if at <= tokio::time::Instant::now() => {
                        stopping = true;
                        shared.limit_counters.hit(Limit::IdleTimeout);
                        conn.graceful_shutdown();
                    }
                    Some(at) => idle_at = Some(at),
                    None => idle_at = Some(tokio::time::Instant::now() + idle),
                }
            }
            () = sleep_until_or_never(ping_at), if pings.is_some() && pong_by.is_none() => {
                let sent = pings.as_mut().map(|p| p.send_ping(h2::Ping::opaque()));
                if !matches!(sent, Some(Ok(()))) {
                    return;
                }
                pong_by = Some(tokio::time::Instant::now() + limits.keepalive_timeout);
            }
            pong = poll_fn(|cx| match pings.as_mut() {
                Some(p) => p.poll_pong(cx),
                None => Poll::Pending,
            }), if pong_by.is_some() => {
                if pong.is_err() {
                    return;
                }
                pong_by = None;
                ping_at = limits.keepalive_time.map(|t| tokio::time::Instant::now() + t);
            }
            () = sleep_until_or_never(pong_by), if pong_by.is_some() => {
                // The client is gone without a word (no FIN, no RST): free what it held.
                shared.limit_counters.hit(Limit::KeepaliveTimeout);
                return;
            }
        }
    }
}

fn counters_for(shared: &Shared) -> &WorkerCounters {
    &shared.workers[workers::current()]
}

/// Ends a connection refused before HTTP/2: FIN, then what the client still sends is read and
/// dropped (bounded) so that closing does not turn into RST.
async fn linger<T: AsyncRead + AsyncWrite + Unpin>(io: &mut T) {
    let _ = tokio::time::timeout(LINGER, async {
        let _ = io.shutdown().await;
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The client side of a call: where its response goes.
struct Front {
    respond: SendResponse<Bytes>,
    /// Once the response headers went out.
    stream: Option<SendStream<Bytes>>,
    /// What a call that asked for debug metadata is told; None for every other call.
    debug: Option<Box<DebugReply>>,
}

impl Front {
    /// Ends the call with a status of the proxy's own.
    fn fail(&mut self, code: u32, message: &str) {
        let status = grpc::status_headers(code, message);
        match &mut self.stream {
            Some(stream) => {
                let _ = stream.send_trailers(status);
            }
            None => {
                let (mut head, ()) = Response::new(()).into_parts();
                head.headers.insert("content-type", GRPC_CONTENT_TYPE);
                head.headers.extend(status);
                let _ = self.trailers_only(head);
            }
        }
    }

    /// Adds the debug metadata, when the call asked for it, to response headers about to go.
    #[inline]
    fn decorate(&self, headers: &mut HeaderMap) {
        if let Some(debug) = &self.debug {
            debug.write(headers);
        }
    }

    /// Ends the call with a Trailers-Only response `head` (a status and its metadata, no
    /// message). A call that asked for debug metadata gets response headers carrying it, then
    /// `head` as trailers: so clients show debug metadata as initial metadata whatever the
    /// outcome, and the status and metadata `head` holds as trailing metadata, as ever.
    fn trailers_only(&mut self, head: http::response::Parts) -> Result<(), ()> {
        let Some(debug) = &self.debug else {
            return self
                .respond
                .send_response(Response::from_parts(head, ()), true)
                .map(drop)
                .map_err(drop);
        };
        let mut trailers = head.headers;
        let content_type = trailers.remove("content-type").unwrap_or(GRPC_CONTENT_TYPE);
        let mut response = Response::new(());
        *response.status_mut() = head.status;
        response.headers_mut().insert("content-type", content_type);
        debug.write(response.headers_mut());
        let mut stream = self.respond.send_response(response, false).map_err(drop)?;
        stream.send_trailers(trailers).map_err(drop)
    }

    fn reset(&mut self, reason: Reason) {
        match &mut self.stream {
            Some(stream) => stream.send_reset(reason),
            None => self.respond.send_reset(reason),
        }
    }
}

const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// What a call asked of the proxy itself, in request headers under `x-weighbridge-`.
#[derive(Default)]
struct Asked {
    /// `x-weighbridge-debug: 1`: debug metadata in the response.
    debug: bool,
    /// `x-weighbridge-endpoint: POD`: that pod, whatever the strategy says.
    endpoint: Option<HeaderValue>,
}

const DEBUG_HEADER: &str = "x-weighbridge-debug";
/// The request header naming the pod a call goes to (read by calls and by Explain).
pub const ENDPOINT_HEADER: &str = "x-weighbridge-endpoint";

/// Debug metadata for one call (`x-weighbridge-debug: 1`), in the response headers: the
/// Service, its strategy, the set's generation and etcd revision, and, once an endpoint is
/// picked, the endpoint of the last try, its pod, the tries made and why it was picked.
struct DebugReply {
    route: Arc<Route>,
    /// The endpoint of the last try.
    target: Option<usize>,
    /// Why it was picked, in the words of Explain.
    why: String,
    tries: u32,
}

impl DebugReply {
    fn write(&self, headers: &mut HeaderMap) {
        let route = &self.route;
        headers.insert("x-weighbridge-service", header_text(&route.key));
        headers.insert("x-weighbridge-strategy", header_text(&route.strategy));
        headers.insert("x-weighbridge-generation", route.generation.into());
        headers.insert("x-weighbridge-revision", route.revision.into());
        let Some(i) = self.target else { return };
        let target = &route.targets[i];
        headers.insert(
            "x-weighbridge-backend",
            header_text(&target.backend.hostport),
        );
        if !target.pod.is_empty() {
            headers.insert("x-weighbridge-pod", header_text(&target.pod));
        }
        headers.insert("x-weighbridge-attempts", self.tries.into());
        headers.insert("x-weighbridge-reason", header_text(&self.why));
    }
}

/// `text` as a gRPC ASCII metadata value: printable ASCII; the few other characters the
/// proxy's explanations use are spelled in ASCII, any other becomes `?`.
fn header_text(text: &str) -> HeaderValue {
    let mut ascii = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            ' '..='~' => ascii.push(c),
            '…' => ascii.push_str("..."),
            '≥' => ascii.push_str(">="),
            '≤' => ascii.push_str("<="),
            '×' => ascii.push('x'),
            '→' => ascii.push_str("->"),
            _ => ascii.push('?'),
        }
    }
    HeaderValue::from_str(&ascii).expect("printable ASCII is a valid header value")
}

enum Fail {
    /// The proxy answers with this status.
    Local(LocalError, u32, String),
    /// The backend reset the stream after the response began: reset the client's alike.
    Reset(Reason),
    /// The client reset the stream or went away: nobody to answer.
    ClientGone,
}

/// What one try says about its endpoint, for outlier detection.
enum Verdict {
    Good,
    /// A failure that counts: connect failure, reset, lost connection, UNAVAILABLE, timeout.
    Bad(String),
    /// Nothing either way (the client went away, a message was too big).
    Neutral,
}

/// How one try ended.
enum Try {
    /// The call is over: answered (true when OK), or failed and passed on.
    Done(bool, Verdict),
    /// The backend never got the call (no connection, GOAWAY, refused stream): it may be sent
    /// again. `endpoint_failed`: the endpoint itself could not take it (try another).
    Unprocessed {
        why: String,
        endpoint_failed: bool,
    },
    /// The backend answered Trailers-Only with this non-OK status; nothing reached the client.
    Status(http::response::Parts, u32),
    /// No response headers within the per-try timeout.
    TimedOut,
    /// The endpoint had no free stream within the wait (it is saturated): try another.
    Busy(String),
    Failed(Fail, Verdict),
}

/// Counts a call in flight for as long as it lives.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Relaxed);
    }
}

async fn call(
    shared: Arc<Shared>,
    conn: Arc<limits::Connection>,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    // Made first: its start is the call's.
    let activity = Activity::new();
    let _call = conn.call();
    shared.counters.calls.fetch_add(1, Relaxed);
    shared.counters.in_flight.fetch_add(1, Relaxed);
    let _in_flight = InFlight(&shared);
    let mut front = Front {
        respond,
        stream: None,
        debug: None,
    };
    let (mut head, body) = request.into_parts();
    let authority = head.uri.authority().map_or("", |a| a.as_str());
    let route = match shared.route(authority, head.uri.path()) {
        Ok((route, _)) => route,
        Err(message) => {
            shared.counters.error(LocalError::NoRoute);
            front.fail(grpc::UNAVAILABLE, &format!("weighbridge: {message}"));
            return;
        }
    };
    let asked = take_own_headers(&mut head.headers);
    if asked.debug && route.policy.debug.metadata {
        route.counters.debug_metadata.fetch_add(1, Relaxed);
        front.debug = Some(Box::new(DebugReply {
            route: Arc::clone(&route),
            target: None,
            why: String::new(),
            tries: 0,
        }));
    }
    let timeout = head
        .headers
        .get("grpc-timeout")
        .and_then(|v| grpc::parse_timeout(v.as_bytes()));
    let mut last = None;
    let serving = serve_call(
        &shared,
        &route,
        head,
        body,
        asked.endpoint,
        &mut front,
        &mut last,
        &activity,
    );
    let deadline = timeout.map(|limit| tokio::time::Instant::now() + limit);
    let outcome = tokio::select! {
        outcome = serving => outcome,
        () = sleep_until_or_never(deadline), if deadline.is_some() => {
            let limit = timeout.expect("deadline set");
            Err(Fail::Local(
                LocalError::DeadlineExceeded,
                grpc::DEADLINE_EXCEEDED,
                format!(
                    "weighbridge: deadline of {}s exceeded{}",
                    limit.as_secs_f64(),
                    last.map_or(String::new(), |i| format!(
                        " waiting for {}",
                        route.targets[i].who
                    ))
                ),
            ))
        }
        () = idle_or_never(&activity, route.policy.stream_idle_timeout) => {
            let idle = route.policy.stream_idle_timeout.expect("idle timeout set");
            Err(Fail::Local(
                LocalError::StreamIdleTimeout,
                grpc::UNAVAILABLE,
                format!(
                    "weighbridge: nothing moved on the call for {}s, the stream idle timeout \
                     of Service {}",
                    idle.as_secs_f64(),
                    route.key
                ),
            ))
        }
    };
    match outcome {
        Ok(_) => {}
        Err(Fail::ClientGone) => {
            if front.stream.is_none() && activity.started().elapsed() < PREMATURE_RESET_WITHIN {
                conn.premature_reset();
            }
        }
        Err(Fail::Local(reason, code, message)) => {
            shared.counters.error(reason);
            front.fail(code, &message);
        }
        Err(Fail::Reset(reason)) => front.reset(reason),
    }
}

/// Headers under `x-weighbridge-` are the proxy's own: taken out of the request, so backends
/// never see them, and read for what the call asks of the proxy (debug metadata, a forced
/// endpoint). The usual call carries none: one pass over its header names, no allocation.
fn take_own_headers(headers: &mut HeaderMap) -> Asked {
    const OWN: &str = "x-weighbridge-";
    let is_own = |name: &http::HeaderName| name.as_str().starts_with(OWN);
    let mut asked = Asked::default();
    if headers.keys().any(is_own) {
        let own: Vec<http::HeaderName> = headers.keys().filter(|n| is_own(n)).cloned().collect();
        for name in own {
            let value = headers.remove(&name);
            match name.as_str() {
                DEBUG_HEADER => {
                    asked.debug = value.is_some_and(|v| {
                        v.as_bytes() == b"1" || v.as_bytes().eq_ignore_ascii_case(b"true")
                    })
                }
                ENDPOINT_HEADER => asked.endpoint = value,
                _ => {}
            }
        }
    }
    asked
}

async fn idle_or_never(activity: &Activity, idle: Option<Duration>) {
    match idle {
        Some(idle) => activity.idle_for(idle).await,
        None => std::future::pending().await,
    }
}

/// The call's tries, one after another, until one answers or none may follow; Ok(true) when
/// the status passed on was OK. `last` is the index of the endpoint tried last. A call that
/// names a pod (`endpoint`, from `x-weighbridge-endpoint`) makes every try to that pod.
#[allow(clippy::too_many_arguments)]
async fn serve_call(
    shared: &Shared,
    route: &Route,
    mut head: http::request::Parts,
    body: RecvStream,
    endpoint: Option<HeaderValue>,
    front: &mut Front,
    last: &mut Option<usize>,
    activity: &Activity,
) -> Result<bool, Fail> {
    let retry = route.policy.retry.as_ref();
    if retry.is_some() {
        route
            .budget
            .deposit(retry::now_s(activity.started().into_std()));
    }
    let limit = grpc::message_limit(&head.headers, shared.max_message_bytes);
    let mut body = RequestBody::new(body, shared, limit, activity);
    let key = route
        .policy
        .hash_header
        .as_ref()
        .and_then(|h| head.headers.get(h))
        .map(|v| hash_key(v.as_bytes()));
    let forced = match endpoint {
        None => None,
        Some(pod) => match route.forced(&String::from_utf8_lossy(pod.as_bytes())) {
            Ok(i) => {
                route.counters.endpoint_overrides.fetch_add(1, Relaxed);
                Some(i)
            }
            Err((reason, code, message)) => {
                return Err(Fail::Local(reason, code, format!("weighbridge: {message}")))
            }
        },
    };
    let no_backend = |message: String| {
        Fail::Local(
            LocalError::NoBackend,
            grpc::UNAVAILABLE,
            format!("weighbridge: {message}"),
        )
    };
    let (mut transparent, mut tries, mut avoid) = (0u32, 0u32, None);
    loop {
        let i = match (forced, front.debug.as_deref_mut()) {
            (None, None) => route.pick(avoid, key).map_err(no_backend)?,
            (Some(i), debug) => {
                if let Some(debug) = debug {
                    debug.why = route.forced_why(i);
                }
                i
            }
            (None, Some(debug)) => {
                let (i, why) = route.pick_why(avoid, key).map_err(no_backend)?;
                debug.why = why;
                i
            }
        };
        if let Some(debug) = front.debug.as_deref_mut() {
            debug.target = Some(i);
            debug.tries += 1;
        }
        *last = Some(i);
        let target = &route.targets[i];
        let mut request = Request::new(());
        *request.method_mut() = head.method.clone();
        *request.uri_mut() = head.uri.clone();
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers.clone();
        let per_try = retry.and_then(|r| r.per_try_timeout);
        let stats = &target.stats;
        stats.requests.fetch_add(1, Relaxed);
        stats.in_flight.fetch_add(1, Relaxed);
        route.in_flight.fetch_add(1, Relaxed);
        let began = Instant::now();
        let outcome = try_once(
            shared, target, request, &mut body, front, per_try, began, activity,
        )
        .await;
        stats.in_flight.fetch_sub(1, Relaxed);
        route.in_flight.fetch_sub(1, Relaxed);
        stats.observe(
            &shared.bounds_ns,
            began.elapsed(),
            matches!(outcome, Try::Done(true, _)),
        );
        let verdict = match &outcome {
            Try::Done(_, v) | Try::Failed(_, v) => v,
            Try::Unprocessed {
                why,
                endpoint_failed: true,
            } => &Verdict::Bad(why.clone()),
            Try::Unprocessed { .. } | Try::Busy(_) => &Verdict::Neutral,
            Try::Status(_, code) if *code == grpc::UNAVAILABLE => {
                &Verdict::Bad("answered UNAVAILABLE".into())
            }
            Try::Status(..) => &Verdict::Good,
            Try::TimedOut => &Verdict::Bad("per-try timeout".into()),
        };
        match verdict {
            Verdict::Good => target.health.succeeded(),
            Verdict::Bad(why) => target
                .health
                .failed(why, route.policy.outlier.as_ref(), || route.ejected_share()),
            Verdict::Neutral => {}
        }
        let (status, code) = match outcome {
            Try::Done(ok, _) => return Ok(ok),
            Try::Failed(fail, _) => return Err(fail),
            Try::Unprocessed {
                why,
                endpoint_failed,
            } => {
                if transparent < retry::TRANSPARENT_RETRIES && body.whole() {
                    transparent += 1;
                    route.counters.transparent_retries.fetch_add(1, Relaxed);
                    avoid = endpoint_failed.then_some(i);
                    continue;
                }
                let reason = if endpoint_failed {
                    LocalError::ConnectFailed
                } else {
                    LocalError::BackendLost
                };
                return Err(Fail::Local(
                    reason,
                    grpc::UNAVAILABLE,
                    format!("weighbridge: {}: {why}", target.who),
                ));
            }
            Try::Busy(why) => {
                if transparent < retry::TRANSPARENT_RETRIES && body.whole() {
                    transparent += 1;
                    route.counters.transparent_retries.fetch_add(1, Relaxed);
                    avoid = Some(i);
                    continue;
                }
                return Err(Fail::Local(
                    LocalError::BackendBusy,
                    grpc::UNAVAILABLE,
                    format!("weighbridge: {}: {why}", target.who),
                ));
            }
            Try::Status(status, code) => (Some(status), code),
            Try::TimedOut => (None, grpc::UNAVAILABLE),
        };
        // Answered Trailers-Only, or timed out: nothing reached the client yet.
        tries += 1;
        let retried = retry.filter(|r| status.is_none() || r.retries(code));
        if let Some(policy) = retried.filter(|r| tries < r.attempts && body.whole()) {
            if route.budget.withdraw(retry::now_s(Instant::now()), policy) {
                route.counters.retries.fetch_add(1, Relaxed);
                let pause = pin!(tokio::time::sleep(policy.backoff(tries)));
                tokio::select! {
                    () = pause => {}
                    _ = poll_fn(|cx| front.respond.poll_reset(cx)) => return Err(Fail::ClientGone),
                }
                head.headers
                    .insert("grpc-previous-rpc-attempts", http::HeaderValue::from(tries));
                avoid = Some(i);
                continue;
            }
            route.counters.budget_exhausted.fetch_add(1, Relaxed);
            let answered = match &status {
                Some(s) => format!(
                    "answered {}",
                    grpc::status_text(&s.headers).unwrap_or_default()
                ),
                None => "did not answer within the per-try timeout".to_string(),
            };
            return Err(Fail::Local(
                LocalError::RetryBudgetExhausted,
                code,
                format!(
                    "weighbridge: not retried: the retry budget of Service {} ({}) is spent; \
                     {} {answered}",
                    route.key,
                    policy.describe_budget(),
                    target.who
                ),
            ));
        }
        return match status {
            Some(status) => {
                front.trailers_only(status).map_err(|()| Fail::ClientGone)?;
                Ok(false)
            }
            None => Err(Fail::Local(
                LocalError::PerTryTimeout,
                grpc::UNAVAILABLE,
                format!(
                    "weighbridge: {}: no response within the per-try timeout of {}s",
                    target.who,
                    per_try_secs(retry)
                ),
            )),
        };
    }
}

fn per_try_secs(retry: Option<&RetryPolicy>) -> f64 {
    retry
        .and_then(|r| r.per_try_timeout)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Whether a stream's error says the backend did not process it: it was above the last
/// stream id of a GOAWAY, or refused.
fn unprocessed(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM))
}

/// Carries one try to `target` and, once it answers, back; `began` is when the try began
/// (its time to response headers feeds the endpoint's latency estimate).
#[allow(clippy::too_many_arguments)]
async fn try_once(
    shared: &Shared,
    target: &Target,
    request: Request<()>,
    body: &mut RequestBody<'_>,
    front: &mut Front,
    per_try: Option<Duration>,
    began: Instant,
    activity: &Activity,
) -> Try {
    let lost = |e: String| {
        Try::Failed(
            Fail::Local(
                LocalError::BackendLost,
                grpc::UNAVAILABLE,
                format!("weighbridge: {}: {e}", target.who),
            ),
            Verdict::Bad(e),
        )
    };
    let mut lease = match target.backend.sender().await {
        Ok(lease) => lease,
        Err(why) => {
            return Try::Unprocessed {
                why,
                endpoint_failed: true,
            }
        }
    };
    // Every connection to the endpoint full: wait (bounded) for one of their streams to end,
    // unless the client gives up first.
    let wait = shared.limits.backend_stream_wait;
    let admitted = {
        let mut admitting = pin!(lease.admitted(tokio::time::Instant::now() + wait));
        poll_fn(|cx| {
            if front.respond.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            admitting.as_mut().poll(cx).map(Some)
        })
        .await
    };
    match admitted {
        Some(true) => {}
        Some(false) => {
            return Try::Busy(format!(
                "no free stream within {}s (--backend-stream-wait): its connections all carry \
                 as many calls as it allows",
                wait.as_secs_f64()
            ))
        }
        None => return Try::Failed(Fail::ClientGone, Verdict::Neutral),
    }
    // `stream` counts the stream on its connection until this try is done.
    let (sender, stream) = lease.into_parts();
    let mut sender_ready = pin!(sender.ready());
    // The connection takes the stream once the previous one is sent: the client may give up
    // meanwhile.
    let ready = poll_fn(|cx| {
        if front.respond.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        sender_ready.as_mut().poll(cx).map(Some)
    });
    let refused = |e: h2::Error| {
        target.backend.draining(&stream, &e);
        Try::Unprocessed {
            why: e.to_string(),
            endpoint_failed: false,
        }
    };
    let mut sender = match ready.await {
        Some(Ok(sender)) => sender,
        Some(Err(e)) => return refused(e),
        None => return Try::Failed(Fail::ClientGone, Verdict::Neutral),
    };
    let (response, mut upstream) = match sender.send_request(request, body.empty) {
        Ok(pair) => pair,
        Err(e) => return refused(e),
    };
    let committed = AtomicBool::new(false);

    // The request runs until the client's half ends, alongside everything below.
    let mut request_done = body.empty;
    let mut request_pipe = pin!(body.send(&mut upstream, &committed));
    let on_request_end = |r: Result<(), PipeError>| -> Result<(), Try> {
        match r {
            Ok(()) | Err(PipeError::DstGone) => Ok(()), // the backend's answer will tell
            Err(PipeError::SrcGone(_)) => Err(Try::Failed(Fail::ClientGone, Verdict::Neutral)),
            Err(PipeError::TooBig(size)) => Err(Try::Failed(
                too_big(shared, "request", size),
                Verdict::Neutral,
            )),
        }
    };

    // Phase 1: until the backend's response headers (within the per-try timeout, if any).
    let mut response = pin!(response);
    let mut per_try_timer = pin!(sleep_until_or_never(
        per_try.map(|d| tokio::time::Instant::now() + d)
    ));
    let response = loop {
        tokio::select! {
            r = &mut request_pipe, if !request_done => {
                request_done = true;
                if let Err(t) = on_request_end(r) {
                    return t;
                }
            }
            r = &mut response => break r,
            _ = poll_fn(|cx| front.respond.poll_reset(cx)) => {
                return Try::Failed(Fail::ClientGone, Verdict::Neutral);
            }
            () = &mut per_try_timer => return Try::TimedOut,
        }
    };
    let response = match response {
        Ok(response) => response,
        Err(e) if unprocessed(&e) => {
            return Try::Unprocessed {
                why: format!("did not process the call: {e}"),
                endpoint_failed: false,
            }
        }
        Err(e) => match e.reason() {
            Some(reason) if e.is_remote() => {
                let why = format!("reset the stream ({reason:?})");
                return Try::Failed(
                    Fail::Local(
                        LocalError::BackendReset,
                        grpc::UNAVAILABLE,
                        format!("weighbridge: {} {why}", target.who),
                    ),
                    Verdict::Bad(why),
                );
            }
            _ => return lost(e.to_string()),
        },
    };
    stream.progressed();
    activity.touch();
    target.stats.rtt.observe(began.elapsed());
    let (head, mut downstream_body) = response.into_parts();
    let limit = grpc::message_limit(&head.headers, shared.max_message_bytes);
    let response_ends = downstream_body.is_end_stream();
    if response_ends {
        // Trailers-Only: the status is in these headers.
        match grpc::status_of(&head.headers).map(grpc::parse_code) {
            Some(Some(0)) => {}
            Some(Some(code)) => return Try::Status(head, code),
            _ => return Try::Status(head, grpc::UNKNOWN),
        }
    }
    committed.store(true, Relaxed);
    if response_ends {
        return match front.trailers_only(head) {
            Ok(()) => Try::Done(true, Verdict::Good),
            Err(()) => Try::Failed(Fail::ClientGone, Verdict::Good),
        };
    }
    let mut head = head;
    front.decorate(&mut head.headers);
    let stream_out = match front
        .respond
        .send_response(Response::from_parts(head, ()), false)
    {
        Ok(s) => s,
        Err(_) => return Try::Failed(Fail::ClientGone, Verdict::Good),
    };
    let downstream = front.stream.insert(stream_out);

    // Phase 2: the response body and trailers, while the request may still be streaming.
    let trailers = {
        let mut response_pipe = pin!(pipe(
            &mut downstream_body,
            downstream,
            limit,
            &stream,
            activity
        ));
        loop {
            tokio::select! {
                r = &mut request_pipe, if !request_done => {
                    request_done = true;
                    if let Err(t) = on_request_end(r) {
                        return t;
                    }
                }
                r = &mut response_pipe => break r,
            }
        }
    };
    let trailers = match trailers {
        Ok(t) => t,
        Err(PipeError::SrcGone(Some(reason))) => {
            return Try::Failed(
                Fail::Reset(reason),
                Verdict::Bad(format!("reset the stream ({reason:?})")),
            )
        }
        // The backend's connection broke mid-call: UNAVAILABLE, not a reset (which clients
        // would read as CANCELLED, their own cancellation).
        Err(PipeError::SrcGone(None)) => return lost("connection lost mid-call".into()),
        Err(PipeError::DstGone) => return Try::Failed(Fail::ClientGone, Verdict::Neutral),
        Err(PipeError::TooBig(size)) => {
            return Try::Failed(too_big(shared, "response", size), Verdict::Neutral)
        }
    };
    let downstream = front.stream.as_mut().expect("response started");
    let (ok, verdict) = match trailers {
        Some(t) => {
            let code = grpc::status_of(&t).and_then(grpc::parse_code);
            let verdict = if code == Some(grpc::UNAVAILABLE) {
                Verdict::Bad("answered UNAVAILABLE".into())
            } else {
                Verdict::Good
            };
            if downstream.send_trailers(t).is_err() {
                return Try::Failed(Fail::ClientGone, verdict);
            }
            (code == Some(0), verdict)
        }
        None => {
            if downstream.send_data(Bytes::new(), true).is_err() {
                return Try::Failed(Fail::ClientGone, Verdict::Neutral);
            }
            (false, Verdict::Good)
        }
    };
    Try::Done(ok, verdict)
}

/// The client's request body, kept (up to the retry buffer) until the response begins, so
/// that a try that did not reach a backend, or that a retry policy retries, can be sent again.
struct RequestBody<'a> {
    body: RecvStream,
    /// The request ended with its headers.
    empty: bool,
    kept: Vec<Bytes>,
    kept_bytes: usize,
    limit: usize,
    /// The client's half ended, with these trailers (if any).
    ended: Option<Option<HeaderMap>>,
    /// All that the client sent so far is in `kept`.
    whole: bool,
    meter: Meter,
    activity: &'a Activity,
}

impl<'a> RequestBody<'a> {
    fn new(body: RecvStream, shared: &Shared, limit: usize, activity: &'a Activity) -> Self {
        RequestBody {
            activity,
            empty: body.is_end_stream(),
            body,
            kept: Vec::new(),
            kept_bytes: 0,
            limit: shared.retry_buffer_bytes,
            ended: None,
            whole: true,
            meter: Meter::new(limit),
        }
    }

    /// Whether the request can be sent again.
    fn whole(&self) -> bool {
        self.whole
    }

    fn forget(&mut self) {
        self.whole = false;
        self.kept = Vec::new();
    }

    /// Sends the request on one try's stream: what was kept, then what the client sends
    /// next. Stops keeping once the response has begun (`committed`).
    async fn send(
        &mut self,
        dst: &mut SendStream<Bytes>,
        committed: &AtomicBool,
    ) -> Result<(), PipeError> {
        if self.empty {
            return Ok(());
        }
        for i in 0..self.kept.len() {
            send_all(dst, self.kept[i].clone()).await?;
        }
        loop {
            if let Some(trailers) = &self.ended {
                return match trailers {
                    Some(t) => dst.send_trailers(t.clone()),
                    None => dst.send_data(Bytes::new(), true),
                }
                .map_err(|_| PipeError::DstGone);
            }
            let body = &mut self.body;
            let next = poll_fn(|cx| {
                if dst.poll_reset(cx).is_ready() {
                    return Poll::Ready(Err(PipeError::DstGone));
                }
                body.poll_data(cx).map(Ok)
            })
            .await?;
            self.activity.touch();
            let data = match next {
                Some(Ok(data)) => data,
                Some(Err(e)) => return Err(src_gone(e)),
                None => {
                    let trailers = poll_fn(|cx| self.body.poll_trailers(cx))
                        .await
                        .map_err(src_gone)?;
                    self.ended = Some(trailers);
                    continue;
                }
            };
            if let Some(size) = self.meter.feed(&data) {
                return Err(PipeError::TooBig(size));
            }
            let len = data.len();
            if self.whole && (committed.load(Relaxed) || self.kept_bytes + len > self.limit) {
                self.forget();
            }
            if self.whole {
                // Kept, so its window can go back to the client at once.
                self.kept_bytes += len;
                self.kept.push(data.clone());
                let _ = self.body.flow_control().release_capacity(len);
                send_all(dst, data).await?;
            } else {
                send_all(dst, data).await?;
                // Window goes back to the sender only now that the bytes have left.
                let _ = self.body.flow_control().release_capacity(len);
            }
        }
    }
}

fn too_big(shared: &Shared, direction: &str, size: usize) -> Fail {
    Fail::Local(
        LocalError::MessageTooBig,
        grpc::RESOURCE_EXHAUSTED,
        format!(
            "weighbridge: {direction} message of {size} bytes is larger than the proxy's limit of \
             {} bytes (--max-message-bytes)",
            shared.max_message_bytes
        ),
    )
}

enum PipeError {
    /// The sending side reset the stream (with its reason, to pass on) or lost its connection
    /// (None).
    SrcGone(Option<Reason>),
    /// The receiving side reset the stream or went away.
    DstGone,
    TooBig(usize),
}

fn src_gone(e: h2::Error) -> PipeError {
    PipeError::SrcGone(e.reason().filter(|_| e.is_remote() && e.is_reset()))
}

/// Sends `data` within `dst`'s flow-control window, waiting for window as needed.
async fn send_all(dst: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), PipeError> {
    while !data.is_empty() {
        dst.reserve_capacity(data.len());
        let granted = poll_fn(|cx| {
            if dst.capacity() > 0 {
                return Poll::Ready(Ok(dst.capacity()));
            }
            match dst.poll_capacity(cx) {
                Poll::Ready(Some(Ok(n))) => Poll::Ready(Ok(n)),
                Poll::Ready(_) => Poll::Ready(Err(PipeError::DstGone)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        dst.send_data(chunk, false)
            .map_err(|_| PipeError::DstGone)?;
    }
    Ok(())
}

/// Forwards DATA from `src` (a backend) to `dst` until `src` ends; returns its trailers, if
/// any. Each frame marks the backend's connection alive (`progress`) and the call too.
async fn pipe(
    src: &mut RecvStream,
    dst: &mut SendStream<Bytes>,
    limit: usize,
    progress: &Stream,
    activity: &Activity,
) -> Result<Option<HeaderMap>, PipeError> {
    let mut meter = Meter::new(limit);
    loop {
        // Next data, noticing at once if the receiver resets meanwhile.
        let next = poll_fn(|cx| {
            if dst.poll_reset(cx).is_ready() {
                return Poll::Ready(Err(PipeError::DstGone));
            }
            src.poll_data(cx).map(Ok)
        })
        .await?;
        let data = match next {
            Some(Ok(data)) => data,
            Some(Err(e)) => return Err(src_gone(e)),
            None => break,
        };
        progress.progressed();
        activity.touch();
        if let Some(size) = meter.feed(&data) {
            return Err(PipeError::TooBig(size));
        }
        let len = data.len();
        send_all(dst, data).await?;
        // Window goes back to the sender only now that the bytes have left.
        let _ = src.flow_control().release_capacity(len);
    }
    poll_fn(|cx| src.poll_trailers(cx)).await.map_err(src_gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_headers_are_taken_out_of_the_request_and_read() {
        let mut h = HeaderMap::new();
        h.insert("x-weighbridge-debug", HeaderValue::from_static("1"));
        h.insert("x-weighbridge-endpoint", HeaderValue::from_static("shop-7"));
        h.insert("x-weighbridge-anything", HeaderValue::from_static("x"));
        h.insert("x-user", HeaderValue::from_static("u"));
        let asked = take_own_headers(&mut h);
        assert!(asked.debug);
        assert_eq!(asked.endpoint.unwrap(), "shop-7");
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-user"]);

        for (value, debug) in [("0", false), ("true", true), ("yes", false)] {
            let mut h = HeaderMap::new();
            h.insert("x-weighbridge-debug", HeaderValue::from_static(value));
            assert_eq!(take_own_headers(&mut h).debug, debug, "{value}");
            assert!(h.is_empty());
        }
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("u"));
        let asked = take_own_headers(&mut h);
        assert!(!asked.debug && asked.endpoint.is_none() && h.len() == 1);
    }

    #[test]
    fn debug_metadata_is_printable_ascii() {
        assert_eq!(header_text("a ≥ b… → é"), "a >= b... -> ?");
    }
}
