//! The audit record of a request that never reaches a handler: a body that does not decode, a
//! message over the size limit, an unknown service or method. tonic answers those itself, before
//! any handler (and so before [`crate::service::AppState::respond`]) runs; this layer, around every
//! service, sees the answer and records it before it leaves, like every other request.
//!
//! A request that `respond` records carries a [`Recorded`] marker (set by `respond`), so that no
//! request is recorded twice. Answers of handlers carry their status in trailers, which this layer
//! never reads; answers tonic makes itself carry it in headers (a "trailers-only" response), which
//! is what it reads. Fail closed: if the record cannot be made durable, the answer becomes
//! `UNAVAILABLE`. Must never record a request body.
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use kms_audit::Outcome;

use super::{AuditLog, RequestFacts};

/// Set on a request whose record the handler's `respond` makes.
#[derive(Clone, Debug, Default)]
pub struct Recorded(Arc<AtomicBool>);

impl Recorded {
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The layer: wraps every gRPC service of the server.
#[derive(Clone)]
pub struct RecordUnrouted {
    audit: AuditLog,
}

impl RecordUnrouted {
    pub fn new(audit: AuditLog) -> RecordUnrouted {
        RecordUnrouted { audit }
    }
}

impl<S> tower_layer::Layer<S> for RecordUnrouted {
    type Service = RecordUnroutedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecordUnroutedService { inner, audit: self.audit.clone() }
    }
}

#[derive(Clone)]
pub struct RecordUnroutedService<S> {
    inner: S,
    audit: AuditLog,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RecordUnroutedService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let marker = Recorded::default();
        request.extensions_mut().insert(marker.clone());
        let path = crate::bounded::owned(request.uri().path(), 256);
        let peer = request.extensions().get::<crate::tls::PeerInfo>().and_then(|p| p.identity.clone().ok());
        // The clone is the one that was made ready; keep a fresh one for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let audit = self.audit.clone();
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            if marker.is_set() {
                return Ok(response);
            }
            let Some(code) = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok()) else {
                return Ok(response);
            };
            if code == 0 {
                return Ok(response);
            }
            let message = response.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default();
            let rpc = if code == tonic::Code::Unimplemented as i32 { "UnknownMethod" } else { "UndecodedRequest" };
            let facts = RequestFacts {
                rpc,
                request_id: crate::service::request_id(),
                caller: peer.as_ref().map(|p| p.uri.clone()).unwrap_or_default(),
                cert_fingerprint: peer.as_ref().map(|p| p.fingerprint.to_vec()).unwrap_or_default(),
                ..Default::default()
            };
            let detail = format!("{path}: {}", crate::bounded::text(message, 512));
            // Whatever tonic answers before a handler is the request's fault (a body that does not
            // decode, an unknown method, a message over the limit), even when it says INTERNAL.
            let outcome = Outcome::Refused;
            tracing::info!(rpc, path = %path, code, "request answered before any handler");
            if audit.append(super::record(&facts, outcome, code, &detail)).await.is_err() {
                let headers = response.headers_mut();
                headers.insert("grpc-status", http::HeaderValue::from(tonic::Code::Unavailable as i32));
                headers.insert(
                    "grpc-message",
                    http::HeaderValue::from_static("the%20audit%20trail%20cannot%20be%20written,%20so%20nothing%20was%20done"),
                );
            }
            Ok(response)
        })
    }
}
