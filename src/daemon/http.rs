//! Health and metrics endpoints of the daemon, over HTTP/1.1:
//!
//! - `GET /healthz`: liveness, 200 `ok` while the process serves requests.
//! - `GET /readyz`: readiness, 200 `ready`, or 503 `not ready: {reason}`.
//! - `GET /metrics`: [`Metrics::render`] in the OpenMetrics text format.
//!
//! Other paths get 404, and other methods on these paths get 405.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use super::metrics::Metrics;

/// Content type of the `/metrics` response, as the OpenMetrics 1.0 specification names it.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The daemon's readiness to take input, as `/readyz` reports it.
#[derive(Debug)]
pub struct Health {
    /// Reason for not being ready, or `None` while ready.
    not_ready: Mutex<Option<String>>,
}

impl Health {
    /// Creates the state "not ready: starting".
    pub fn new() -> Self {
        Health { not_ready: Mutex::new(Some("starting".to_owned())) }
    }

    /// Sets readiness and logs each change, a change to not ready as a
    /// warning. `reason` is ignored when `ready` is true.
    pub fn set_ready(&self, ready: bool, reason: &str) {
        self.change(if ready { None } else { Some(reason.to_owned()) }, tracing::Level::WARN);
    }

    /// Sets the daemon not ready for a routine step, such as a drain, and
    /// logs the change at the info level.
    pub fn set_busy(&self, reason: &str) {
        self.change(Some(reason.to_owned()), tracing::Level::INFO);
    }

    fn change(&self, next: Option<String>, level: tracing::Level) {
        let mut not_ready = self.not_ready.lock().unwrap_or_else(PoisonError::into_inner);
        if *not_ready == next {
            return;
        }
        match &next {
            None => tracing::info!("daemon ready"),
            Some(reason) if level == tracing::Level::WARN => tracing::warn!(reason = %reason, "daemon not ready"),
            Some(reason) => tracing::info!(reason = %reason, "daemon not ready"),
        }
        *not_ready = next;
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Returns why the daemon is not ready, or `None` if it is ready.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.not_ready.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

/// Failure to set up the health and metrics server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {address} for health and metrics: {}", describe_bind_error(.error))]
    Bind { address: SocketAddr, error: io::Error },
}

/// Describes a bind failure with the fix, in words for the common causes and the OS message otherwise.
fn describe_bind_error(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::AddrInUse => "address in use; set `daemon.http` to a free port".to_owned(),
        io::ErrorKind::PermissionDenied => {
            "permission denied; set `daemon.http` to a port above 1023, or give the process CAP_NET_BIND_SERVICE"
                .to_owned()
        }
        io::ErrorKind::AddrNotAvailable => {
            "no network interface on this machine has that address; set `daemon.http` to a local address such as \
             127.0.0.1:9464"
                .to_owned()
        }
        _ => format!("{error}; check `daemon.http`"),
    }
}

/// Binds the listener for [`serve`].
///
/// Binding is a separate step so that the daemon can fail on a port in use before it starts work.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(address).await.map_err(|error| HttpError::Bind { address, error })
}

#[derive(Clone)]
struct Endpoints {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves the health and metrics endpoints on `listener` until `shutdown` completes.
///
/// After `shutdown` completes, the server stops accepting connections, lets the requests
/// in progress finish, and returns once every connection has closed.
///
/// NOTE: axum 0.8 sets no time limit on that wait, so a client that stops halfway through
/// sending a request delays the return. Callers that must stop promptly should wrap this in a timeout.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let router = Router::new()
        .route("/healthz", get(liveness))
        .route("/readyz", get(readiness))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .with_state(Endpoints { metrics, health });

    let address = listener.local_addr()?;
    tracing::info!(%address, "health and metrics server listening");
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    tracing::info!(%address, "health and metrics server stopped");
    Ok(())
}

async fn liveness() -> &'static str {
    "ok\n"
}

async fn readiness(State(endpoints): State<Endpoints>) -> Response {
    match endpoints.health.not_ready_reason() {
        None => "ready\n".into_response(),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response(),
    }
}

async fn render_metrics(State(endpoints): State<Endpoints>) -> Response {
    ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], endpoints.metrics.render()).into_response()
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found; the endpoints are /healthz, /readyz and /metrics\n")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;

    /// A parsed HTTP/1.1 response.
    struct Reply {
        status_line: String,
        headers: String,
        body: String,
    }

    /// Sends one request over a fresh connection and reads the response until the server closes it.
    async fn request(address: SocketAddr, method: &str, path: &str) -> Reply {
        let mut stream = TcpStream::connect(address).await.expect("connect to the test server");
        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send request");

        let mut raw = String::new();
        let read = stream.read_to_string(&mut raw);
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("response within 10 s")
            .expect("read response");

        let (head, body) = raw.split_once("\r\n\r\n").expect("response has a header section");
        let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        Reply { status_line: status_line.to_owned(), headers: headers.to_ascii_lowercase(), body: body.to_owned() }
    }

    struct TestServer {
        address: SocketAddr,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        stop: oneshot::Sender<()>,
        task: JoinHandle<io::Result<()>>,
    }

    async fn start() -> TestServer {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.expect("bind a free loopback port");
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve(listener, metrics.clone(), health.clone(), shutdown));
        TestServer { address, metrics, health, stop, task }
    }

    async fn stop(server: TestServer) {
        server.stop.send(()).expect("server still running");
        let result = tokio::time::timeout(Duration::from_secs(10), server.task).await;
        result.expect("server stops within 10 s").expect("server task panicked").expect("server failed");
    }

    #[tokio::test]
    async fn healthz_returns_ok() {
        let server = start().await;

        let reply = request(server.address, "GET", "/healthz").await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert_eq!(reply.body, "ok\n");

        stop(server).await;
    }

    #[tokio::test]
    async fn readyz_follows_health() {
        let server = start().await;
        assert!(!server.health.is_ready());

        let reply = request(server.address, "GET", "/readyz").await;
        assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(reply.body, "not ready: starting\n");

        server.health.set_ready(true, "");
        assert!(server.health.is_ready());
        let reply = request(server.address, "GET", "/readyz").await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert_eq!(reply.body, "ready\n");

        server.health.set_ready(false, "output disk is full");
        let reply = request(server.address, "GET", "/readyz").await;
        assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(reply.body, "not ready: output disk is full\n");

        server.health.set_ready(true, "");
        let reply = request(server.address, "GET", "/readyz").await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert_eq!(reply.body, "ready\n");

        let reply = request(server.address, "GET", "/healthz").await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");

        stop(server).await;
    }

    #[tokio::test]
    async fn metrics_returns_openmetrics_text() {
        let server = start().await;
        server.metrics.records_written(5, 10);

        let reply = request(server.address, "GET", "/metrics").await;
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        let content_type = format!("content-type: {OPENMETRICS_CONTENT_TYPE}\r\n");
        assert!(format!("{}\r\n", reply.headers).contains(&content_type), "{}", reply.headers);
        assert!(reply.body.contains("\nstochflow_records_out_total 5\n"), "{}", reply.body);
        assert!(reply.body.ends_with("# EOF\n"), "{}", reply.body);

        stop(server).await;
    }

    #[tokio::test]
    async fn unknown_path_and_method() {
        let server = start().await;

        let reply = request(server.address, "GET", "/").await;
        assert_eq!(reply.status_line, "HTTP/1.1 404 Not Found");
        assert!(reply.body.starts_with("not found"), "{}", reply.body);

        let reply = request(server.address, "GET", "/metrics/extra").await;
        assert_eq!(reply.status_line, "HTTP/1.1 404 Not Found");

        let reply = request(server.address, "POST", "/metrics").await;
        assert_eq!(reply.status_line, "HTTP/1.1 405 Method Not Allowed");

        stop(server).await;
    }

    #[tokio::test]
    async fn bind_port_in_use_names_address() {
        let existing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = existing.local_addr().unwrap();

        let error = bind(address).await.expect_err("port is in use");
        let message = error.to_string();
        assert!(message.contains(&format!("cannot listen on {address} for health and metrics")), "{message}");
        assert!(message.contains("address in use"), "{message}");
        assert!(message.contains("`daemon.http`"), "{message}");
    }

    #[test]
    fn health_starts_not_ready() {
        let health = Health::new();
        assert!(!health.is_ready());
        assert_eq!(health.not_ready_reason().as_deref(), Some("starting"));
    }
}
