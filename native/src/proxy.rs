//! Carrying calls: one client HTTP/2 stream ↔ one backend HTTP/2 stream, data as it comes.
//!
//! Each direction is a pipe that forwards DATA within the receiver's flow-control window and
//! returns window to the sender only once the bytes have left, so a slow reader slows its
//! writer instead of filling the proxy's memory. Headers and trailers pass unchanged, and so do
//! the backend's status and details. Errors the proxy produces itself are gRPC statuses whose
//! message starts with `weighbridge:` and names the route or backend concerned.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::engine::Shared;
use crate::grpc::{self, Meter};
use crate::routing::Target;
use crate::stats::LocalError;
use crate::workers::{self, WorkerCounters};

pub const STREAM_WINDOW: u32 = 1 << 20;
/// 8 MiB, not 16: 1 MiB messages moved at least as fast with less memory (docs/performance.md).
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Streams a client may open at once on one connection. 1000, not 4096: at 2000 calls in
/// flight on one connection the proxy held 4.6 MB less and answered with a lower median, the
/// excess waiting at the client instead of inside the proxy (docs/performance.md, tuning).
const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Accepts client connections on this thread until told to stop.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => {
                    tokio::spawn(serve_connection(Arc::clone(&shared), sock, stop.clone()));
                }
                // Out of file descriptors and the like: pause rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            _ = stop.changed() => return,
        }
    }
}

/// Counts a client connection open on this thread for as long as it lives.
struct Open<'a>(&'a WorkerCounters);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// When a connection accepted now reaches its maximum age: `age` ± 10%, so that connections
/// opened together do not all go away together.
fn age_deadline(age: Option<Duration>) -> Option<tokio::time::Instant> {
    age.map(|age| tokio::time::Instant::now() + age.mul_f64(0.9 + 0.2 * fastrand::f64()))
}

async fn serve_connection(shared: Arc<Shared>, sock: TcpStream, mut stop: watch::Receiver<bool>) {
    let counters = &shared.workers[workers::current()];
    counters.connections.fetch_add(1, Relaxed);
    counters.open.fetch_add(1, Relaxed);
    let _open = Open(counters);
    let _ = sock.set_nodelay(true);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .handshake::<_, Bytes>(sock);
    let Ok(mut conn) = handshake.await else {
        return;
    };
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
                    counters.calls.fetch_add(1, Relaxed);
                    tokio::spawn(call(Arc::clone(&shared), request, respond));
                }
                _ => return,
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
        }
    }
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
                let mut response = Response::new(());
                let headers = response.headers_mut();
                headers.insert(
                    "content-type",
                    http::HeaderValue::from_static("application/grpc"),
                );
                headers.extend(status);
                let _ = self.respond.send_response(response, true);
            }
        }
    }

    fn reset(&mut self, reason: Reason) {
        match &mut self.stream {
            Some(stream) => stream.send_reset(reason),
            None => self.respond.send_reset(reason),
        }
    }
}

enum Fail {
    /// The proxy answers with this status.
    Local(LocalError, u32, String),
    /// The backend reset or lost the stream after the response began: reset the client's.
    Reset(Reason),
    /// The client reset the stream or went away: nobody to answer.
    ClientGone,
}

/// Counts a call in flight for as long as it lives.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Relaxed);
    }
}

async fn call(shared: Arc<Shared>, request: Request<RecvStream>, respond: SendResponse<Bytes>) {
    let started = Instant::now();
    shared.counters.calls.fetch_add(1, Relaxed);
    shared.counters.in_flight.fetch_add(1, Relaxed);
    let _in_flight = InFlight(&shared);
    let mut front = Front {
        respond,
        stream: None,
    };
    let (parts, body) = request.into_parts();
    let authority = parts.uri.authority().map_or("", |a| a.as_str());
    let routed = shared.route(authority, parts.uri.path());
    let route = match routed {
        Ok((route, _)) => route,
        Err(message) => {
            shared.counters.error(LocalError::NoRoute);
            front.fail(grpc::UNAVAILABLE, &format!("weighbridge: {message}"));
            return;
        }
    };
    let target = match route.picker.pick() {
        Ok(i) => &route.targets[i],
        Err(message) => {
            shared.counters.error(LocalError::NoBackend);
            front.fail(grpc::UNAVAILABLE, &format!("weighbridge: {message}"));
            return;
        }
    };
    let stats = &target.stats;
    stats.requests.fetch_add(1, Relaxed);
    stats.in_flight.fetch_add(1, Relaxed);
    let timeout = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| grpc::parse_timeout(v.as_bytes()));
    let forwarding = forward(
        &shared,
        target,
        Request::from_parts(parts, ()),
        body,
        &mut front,
    );
    let outcome = match timeout {
        None => forwarding.await,
        Some(limit) => match tokio::time::timeout(limit, forwarding).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Fail::Local(
                LocalError::DeadlineExceeded,
                grpc::DEADLINE_EXCEEDED,
                format!(
                    "weighbridge: deadline of {}s exceeded waiting for {}",
                    limit.as_secs_f64(),
                    target.who
                ),
            )),
        },
    };
    let ok = match outcome {
        Ok(ok) => ok,
        Err(Fail::Local(reason, code, message)) => {
            shared.counters.error(reason);
            front.fail(code, &message);
            false
        }
        Err(Fail::Reset(reason)) => {
            front.reset(reason);
            false
        }
        Err(Fail::ClientGone) => false,
    };
    stats.in_flight.fetch_sub(1, Relaxed);
    stats.observe(&shared.bounds_ns, started.elapsed(), ok);
}

/// Carries one call to `target` and back; Ok(true) when the backend's status was OK.
async fn forward(
    shared: &Shared,
    target: &Target,
    request: Request<()>,
    mut body: RecvStream,
    front: &mut Front,
) -> Result<bool, Fail> {
    let lost = |e: String| {
        Fail::Local(
            LocalError::BackendLost,
            grpc::UNAVAILABLE,
            format!("weighbridge: {}: {e}", target.who),
        )
    };
    // `_stream` counts the stream on its connection until this call is done.
    let (sender, _stream) = target
        .backend
        .sender()
        .await
        .map_err(|e| {
            Fail::Local(
                LocalError::ConnectFailed,
                grpc::UNAVAILABLE,
                format!("weighbridge: {}: {e}", target.who),
            )
        })?
        .into_parts();
    let mut sender_ready = pin!(sender.ready());
    // Waiting for a stream slot on the backend: the client may give up meanwhile.
    let ready = poll_fn(|cx| {
        if front.respond.poll_reset(cx).is_ready() {
            return Poll::Ready(Err(Fail::ClientGone));
        }
        sender_ready
            .as_mut()
            .poll(cx)
            .map(|r| r.map_err(|e| lost(e.to_string())))
    });
    let mut sender = ready.await?;
    let request_ends = body.is_end_stream();
    let (response, mut upstream) = sender
        .send_request(request, request_ends)
        .map_err(|e| lost(e.to_string()))?;
    let limit = shared.max_message_bytes;

    // The request pipe runs until the client's half ends, alongside everything below.
    let mut request_done = request_ends;
    let mut request_pipe = pin!(async {
        let trailers = pipe(&mut body, &mut upstream, limit).await?;
        match trailers {
            Some(t) => upstream.send_trailers(t).map_err(|_| PipeError::DstGone)?,
            None => upstream
                .send_data(Bytes::new(), true)
                .map_err(|_| PipeError::DstGone)?,
        }
        Ok::<(), PipeError>(())
    });
    let on_request_end = |r: Result<(), PipeError>| -> Result<(), Fail> {
        match r {
            Ok(()) | Err(PipeError::DstGone) => Ok(()), // the backend's answer will tell
            Err(PipeError::SrcGone(_)) => Err(Fail::ClientGone),
            Err(PipeError::TooBig(size)) => Err(too_big(shared, "request", size)),
        }
    };

    // Phase 1: until the backend's response headers.
    let mut response = pin!(response);
    let response = loop {
        tokio::select! {
            r = &mut request_pipe, if !request_done => {
                request_done = true;
                on_request_end(r)?;
            }
            r = &mut response => break r,
            _ = poll_fn(|cx| front.respond.poll_reset(cx)) => return Err(Fail::ClientGone),
        }
    };
    let response = response.map_err(|e| match e.reason() {
        Some(reason) if e.is_remote() => Fail::Local(
            LocalError::BackendReset,
            grpc::UNAVAILABLE,
            format!("weighbridge: {} reset the stream ({reason:?})", target.who),
        ),
        _ => lost(e.to_string()),
    })?;
    let (head, mut downstream_body) = response.into_parts();
    let response_ends = downstream_body.is_end_stream();
    let trailers_only_ok = response_ends && grpc::status_of(&head.headers) == Some(b"0");
    let stream = front
        .respond
        .send_response(Response::from_parts(head, ()), response_ends)
        .map_err(|_| Fail::ClientGone)?;
    if response_ends {
        return Ok(trailers_only_ok); // Trailers-Only: the status was in those headers
    }
    let downstream = front.stream.insert(stream);

    // Phase 2: the response body and trailers, while the request may still be streaming.
    let trailers = {
        let mut response_pipe = pin!(pipe(&mut downstream_body, downstream, limit));
        loop {
            tokio::select! {
                r = &mut request_pipe, if !request_done => {
                    request_done = true;
                    on_request_end(r)?;
                }
                r = &mut response_pipe => break r,
            }
        }
    };
    let trailers = trailers.map_err(|e| match e {
        PipeError::SrcGone(reason) => Fail::Reset(reason),
        PipeError::DstGone => Fail::ClientGone,
        PipeError::TooBig(size) => too_big(shared, "response", size),
    })?;
    let downstream = front.stream.as_mut().expect("response started");
    let ok = match trailers {
        Some(t) => {
            let ok = grpc::status_of(&t) == Some(b"0");
            downstream.send_trailers(t).map_err(|_| Fail::ClientGone)?;
            ok
        }
        None => {
            downstream
                .send_data(Bytes::new(), true)
                .map_err(|_| Fail::ClientGone)?;
            false
        }
    };
    Ok(ok)
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
    /// The sending side reset the stream or lost its connection (with the reason to pass on).
    SrcGone(Reason),
    /// The receiving side reset the stream or went away.
    DstGone,
    TooBig(usize),
}

/// Forwards DATA from `src` to `dst` until `src` ends; returns its trailers, if any.
async fn pipe(
    src: &mut RecvStream,
    dst: &mut SendStream<Bytes>,
    limit: usize,
) -> Result<Option<HeaderMap>, PipeError> {
    let mut meter = Meter::new(limit);
    let src_gone = |e: h2::Error| {
        PipeError::SrcGone(
            e.reason()
                .filter(|_| e.is_remote())
                .unwrap_or(Reason::CANCEL),
        )
    };
    loop {
        // Next data, noticing at once if the receiver resets meanwhile.
        let next = poll_fn(|cx| {
            if dst.poll_reset(cx).is_ready() {
                return Poll::Ready(Err(PipeError::DstGone));
            }
            src.poll_data(cx).map(Ok)
        })
        .await?;
        let mut data = match next {
            Some(Ok(data)) => data,
            Some(Err(e)) => return Err(src_gone(e)),
            None => break,
        };
        if let Some(size) = meter.feed(&data) {
            return Err(PipeError::TooBig(size));
        }
        let len = data.len();
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
        // Window goes back to the sender only now that the bytes have left.
        let _ = src.flow_control().release_capacity(len);
    }
    poll_fn(|cx| src.poll_trailers(cx)).await.map_err(src_gone)
}
