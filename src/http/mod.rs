//! The HTTP edge: the callback port ([`callback`]) and the operator API port ([`api`]), both
//! served by [`serve`], which owns accepting, keep-alive and graceful shutdown.

pub mod api;
pub mod callback;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use tokio::sync::{Semaphore, watch};

pub type HttpResponse = Response<Full<Bytes>>;

/// Per-server protection against slow or numerous clients.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// A client must send a request's headers within this, from the moment the connection is
    /// ready for one; hyper's timer also runs while a kept-alive connection waits for its next
    /// request, so this is the keep-alive idle timeout too.
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    /// Connections served at once. Past it, new connections wait in the kernel's accept queue
    /// (they are not refused) and existing ones keep working.
    pub max_connections: usize,
}

/// Serves `handler` on `listener` until `shutdown` turns true, then stops accepting, lets in-flight
/// requests finish (at most `drain_timeout`) and returns. `name` labels the log lines.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        // A free slot first, then a connection: at the limit, clients wait in the accept queue.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = stop_requested(&mut shutdown) => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(server = name, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let handler = handler.clone();
                let service = service_fn(move |request| {
                    let response = handler(request, peer);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let watcher = graceful.watcher();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let served = match tls {
                        None => serve_one(stream, service, limits, watcher).await,
                        // The handshake counts against the header read timeout.
                        Some(tls) => match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
                            Ok(Ok(stream)) => serve_one(stream, service, limits, watcher).await,
                            Ok(Err(error)) => Err(format!("TLS handshake failed: {error}")),
                            Err(_) => Err("TLS handshake timed out".to_owned()),
                        },
                    };
                    if let Err(error) = served {
                        tracing::debug!(server = name, %peer, %error, "connection ended with an error");
                    }
                });
            }
            () = stop_requested(&mut shutdown) => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(server = name, "all connections drained"),
        () = tokio::time::sleep(drain_timeout) => {
            tracing::warn!(server = name, timeout_s = drain_timeout.as_secs(), "drain timed out; closing remaining connections");
        }
    }
}

/// Serves HTTP/1.1 on one connection (plain or TLS) until it closes or shutdown drains it.
async fn serve_one<I, S>(
    io: I,
    service: S,
    limits: ConnectionLimits,
    watcher: Watcher,
) -> Result<(), String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>> + Send + 'static,
    S::Future: Send + 'static,
{
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    watcher
        .watch(connection)
        .await
        .map_err(|error| error.to_string())
}

/// Completes once `shutdown` turns true (or its sender is gone).
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here, not across the caller's await.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

pub(crate) fn json_response(status: StatusCode, value: &impl serde::Serialize) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => response(status, "application/json", body),
        Err(error) => {
            tracing::error!(%error, "failed to serialise a response");
            response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                r#"{"error":{"code":"INTERNAL","message":"failed to serialise the response"}}"#,
            )
        }
    }
}
