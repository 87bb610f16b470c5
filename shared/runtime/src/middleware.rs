//! The tower layers every service runs behind, outermost first:
//!
//! 1. [`RequestContextLayer`]: takes the request id from `x-request-id` (or the trace id of a W3C
//!    `traceparent`) or makes one, opens a span per request carrying it, echoes it back, keeps it
//!    in a task-local for outgoing calls ([`current_request_id`]), and records the call's
//!    metrics once its gRPC status is known (headers for errors, trailers for normal ends).
//! 2. [`LoadShedLayer`]: a global concurrency limit; a call over it is refused at once with
//!    `RESOURCE_EXHAUSTED` rather than queued.
//! 3. [`crate::auth::AuthLayer`]: bearer token and scope.
//! 4. [`TimeoutLayer`]: the configured deadline (or the client's shorter `grpc-timeout`);
//!    an expired call answers `DEADLINE_EXCEEDED`. For a stream it bounds the time to its start.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::{BoxFuture, FutureExt};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::Semaphore;
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::metrics::{CallLabels, MethodLabels, Metrics};

tokio::task_local! {
    static REQUEST_ID: Arc<str>;
}

/// The request id of the call being served on this task, if any; clients pass it on.
pub fn current_request_id() -> Option<Arc<str>> {
    REQUEST_ID.try_with(Arc::clone).ok()
}

/// The metadata key of the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

fn request_id_of(req: &http::Request<Body>) -> Arc<str> {
    let headers = req.headers();
    if let Some(id) = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
    {
        return id.into();
    }
    // W3C trace context: version-traceid-parentid-flags; the trace id names the request.
    if let Some(trace_id) = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|t| t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return trace_id.into();
    }
    uuid::Uuid::new_v4().simple().to_string().into()
}

/// See the module documentation.
#[derive(Clone)]
pub struct RequestContextLayer {
    service: &'static str,
    metrics: Arc<Metrics>,
}

impl RequestContextLayer {
    /// A layer naming `service` in spans and recording into `metrics`.
    pub fn new(service: &'static str, metrics: Arc<Metrics>) -> Self {
        Self { service, metrics }
    }
}

impl<S> Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestContext {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service produced by [`RequestContextLayer`].
#[derive(Clone)]
pub struct RequestContext<S> {
    inner: S,
    layer: RequestContextLayer,
}

impl<S, B> Service<http::Request<Body>> for RequestContext<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<MeteredBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let request_id = request_id_of(&req);
        let method: Arc<str> = req.uri().path().into();
        let span = tracing::info_span!(
            "rpc",
            service = self.layer.service,
            method = %method,
            request_id = %request_id,
            caller = tracing::field::Empty,
        );
        let metrics = Arc::clone(&self.layer.metrics);
        metrics.in_flight.inc();
        let guard = CallGuard {
            metrics,
            method,
            started: Instant::now(),
            code: None,
        };
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let header_value = http::HeaderValue::from_str(&request_id).ok();
        REQUEST_ID
            .scope(request_id, fut.instrument(span))
            .map(move |result| {
                result.map(|response| {
                    let mut guard = guard;
                    // A trailers-only response (every error) carries its status in the headers.
                    guard.code = grpc_code(response.headers());
                    let (mut parts, body) = response.into_parts();
                    if let Some(v) = header_value {
                        parts.headers.insert(REQUEST_ID_HEADER, v);
                    }
                    http::Response::from_parts(
                        parts,
                        MeteredBody {
                            inner: body,
                            guard: Some(guard),
                        },
                    )
                })
            })
            .boxed()
    }
}

fn grpc_code(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

struct CallGuard {
    metrics: Arc<Metrics>,
    method: Arc<str>,
    started: Instant,
    code: Option<Code>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        // A body dropped before its trailers means the client went away.
        let code = self.code.unwrap_or(Code::Cancelled);
        self.metrics.in_flight.dec();
        self.metrics
            .rpc_requests
            .get_or_create(&CallLabels {
                method: self.method.to_string(),
                code: code_name(code).to_string(),
            })
            .inc();
        self.metrics
            .rpc_latency
            .get_or_create(&MethodLabels {
                method: self.method.to_string(),
            })
            .observe(self.started.elapsed().as_secs_f64());
        tracing::debug!(method = %self.method, code = code_name(code), "call finished");
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pin_project! {
    /// A response body that records its call's metrics when the stream ends or is dropped.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        guard: Option<CallGuard>,
    }
}

impl<B: HttpBody> HttpBody for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(guard)) = (frame.trailers_ref(), this.guard.as_mut())
                    && let Some(code) = grpc_code(trailers)
                {
                    guard.code = Some(code);
                }
            }
            Poll::Ready(None) => {
                if let Some(mut guard) = this.guard.take() {
                    guard.code.get_or_insert(Code::Ok);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(guard) = this.guard.as_mut() {
                    guard.code.get_or_insert(Code::Internal);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct LoadShedLayer {
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl LoadShedLayer {
    /// At most `limit` calls at once.
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            metrics,
        }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LoadShed {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service produced by [`LoadShedLayer`].
#[derive(Clone)]
pub struct LoadShed<S> {
    inner: S,
    layer: LoadShedLayer,
}

impl<S, B> Service<http::Request<Body>> for LoadShed<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match Arc::clone(&self.layer.permits).try_acquire_owned() {
            Ok(permit) => self
                .inner
                .call(req)
                .map(move |r| {
                    drop(permit);
                    r
                })
                .boxed(),
            Err(_) => {
                self.layer.metrics.shed.inc();
                let status = Status::resource_exhausted(
                    "server is at its concurrency limit; retry with backoff",
                );
                futures::future::ready(Ok(status.into_http())).boxed()
            }
        }
    }
}

/// See the module documentation.
#[derive(Clone, Copy)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    /// Calls longer than `limit` end with `DEADLINE_EXCEEDED`.
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Timeout {
            inner,
            limit: self.limit,
        }
    }
}

/// The service produced by [`TimeoutLayer`].
#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
    limit: Duration,
}

/// Parses the `grpc-timeout` header (e.g. `500m`, `3S`).
fn client_deadline(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S, B> Service<http::Request<Body>> for Timeout<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let limit =
            client_deadline(req.headers()).map_or(self.limit, |client| client.min(self.limit));
        let fut = self.inner.call(req);
        async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(?limit, "call exceeded its deadline");
                    Ok(Status::deadline_exceeded(format!(
                        "call did not finish within {} ms",
                        limit.as_millis()
                    ))
                    .into_http())
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(client_deadline(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(client_deadline(&h), Some(Duration::from_secs(2)));
        h.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(client_deadline(&h), None);
    }

    #[test]
    fn request_id_comes_from_header_traceparent_or_is_made() {
        let req = http::Request::builder()
            .header("x-request-id", "abc-123")
            .body(Body::default())
            .unwrap();
        assert_eq!(&*request_id_of(&req), "abc-123");
        let req = http::Request::builder()
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(Body::default())
            .unwrap();
        assert_eq!(&*request_id_of(&req), "4bf92f3577b34da6a3ce929d0e0e4736");
        let req = http::Request::builder().body(Body::default()).unwrap();
        assert_eq!(request_id_of(&req).len(), 32);
    }
}
