//! Calling another service: a channel to a peer whose calls carry the peer's bearer token and
//! pass on the request id of the call being served (see [`crate::middleware`]), over TLS when
//! the peer's URL is `https://` (trusting only the peer's configured CA).

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tonic::{
    Code, Request, Status,
    body::Body,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use anyhow::Context as _;

use crate::{config::PeerConfig, middleware};

/// Adds `authorization` and `x-request-id` to every outgoing call.
#[derive(Clone)]
pub struct PeerAuth {
    bearer: MetadataValue<tonic::metadata::Ascii>,
}

impl Interceptor for PeerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.bearer.clone());
        if let Some(id) = middleware::current_request_id()
            && let Ok(v) = MetadataValue::try_from(&*id)
        {
            req.metadata_mut().insert(middleware::REQUEST_ID_HEADER, v);
        }
        Ok(req)
    }
}

/// A channel to a peer, wrapped with [`PeerAuth`].
pub type PeerChannel = InterceptedService<PeerTransport, PeerAuth>;

/// The connection to a peer: a [`Channel`] whose transport failures (the peer down, a
/// connection refused or cut, no answer within the timeout) become a `Status` that names the
/// peer, e.g. `UNAVAILABLE: credits-wallet (peer `wallet` at http://127.0.0.1:50051) is
/// unreachable: tcp connect error: Connection refused`, instead of tonic's bare
/// `tcp connect error`. The code is tonic's (`UNAVAILABLE`, or `CANCELLED` for the timeout);
/// statuses the peer itself answers pass through unchanged.
#[derive(Clone)]
pub struct PeerTransport {
    inner: Channel,
    /// `credits-wallet (peer `wallet` at http://...)`.
    who: Arc<str>,
}

impl PeerTransport {
    /// The description of the peer in errors: its service, configured name and URL.
    pub fn describe(peer: &PeerConfig) -> String {
        format!(
            "{} (peer `{}` at {})",
            peer.service,
            peer.name,
            crate::config::redact_url(&peer.url)
        )
    }
}

/// `err`, a transport failure reaching the peer `who`, as the `Status` a caller sees.
fn unreachable(who: &str, err: tonic::transport::Error) -> Status {
    let status = Status::from_error(Box::new(err));
    let message = match status.code() {
        Code::Unavailable | Code::Unknown => format!("{who} is unreachable: {}", status.message()),
        Code::Cancelled | Code::DeadlineExceeded => {
            format!("{who} did not answer in time: {}", status.message())
        }
        _ => format!("{who}: {}", status.message()),
    };
    let code = match status.code() {
        Code::Unknown => Code::Unavailable,
        code => code,
    };
    Status::new(code, message)
}

impl tower::Service<http::Request<Body>> for PeerTransport {
    type Response = http::Response<Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| unreachable(&self.who, e))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let call = self.inner.call(req);
        let who = Arc::clone(&self.who);
        Box::pin(async move { call.await.map_err(|e| unreachable(&who, e)) })
    }
}

/// Builds a lazily-connecting channel: the first call connects, and a peer that is down makes
/// calls fail fast with `UNAVAILABLE` rather than failing start-up.
pub fn peer_channel(peer: &PeerConfig, timeout: Duration) -> anyhow::Result<PeerChannel> {
    let mut endpoint = Endpoint::from_shared(peer.url.clone())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
        .tcp_nodelay(true);
    if let Some(ca_path) = &peer.ca_path {
        // The peer's certificate must be signed by this CA and name the URL's host.
        let ca = std::fs::read(ca_path)
            .with_context(|| format!("peer CA file {}", ca_path.display()))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?;
    }
    let bearer = MetadataValue::try_from(format!("Bearer {}", peer.token))
        .map_err(|_| anyhow::anyhow!("peer token contains characters not allowed in metadata"))?;
    let transport = PeerTransport {
        inner: endpoint.connect_lazy(),
        who: PeerTransport::describe(peer).into(),
    };
    Ok(InterceptedService::new(transport, PeerAuth { bearer }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_is_down_is_named_in_the_error() {
        // A port with nothing listening.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let peer = PeerConfig {
            name: "wallet".into(),
            service: "credits-wallet".into(),
            url: format!("http://{addr}"),
            token: "peer-secret-1".into(),
            ca_path: None,
        };
        let channel = peer_channel(&peer, Duration::from_secs(1)).unwrap();
        let status = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let named = format!("credits-wallet (peer `wallet` at http://{addr}) is unreachable: ");
        assert!(status.message().starts_with(&named), "{status:?}");
        assert!(!status.message().contains("peer-secret-1"));
    }
}
