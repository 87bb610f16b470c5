//! Calling another service: a channel to a peer whose calls carry the peer's bearer token and
//! pass on the request id of the call being served (see [`crate::middleware`]), over TLS when
//! the peer's URL is `https://` (trusting only the peer's configured CA).

use std::time::Duration;

use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use anyhow::Context;

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
pub type PeerChannel = InterceptedService<Channel, PeerAuth>;

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
    Ok(InterceptedService::new(
        endpoint.connect_lazy(),
        PeerAuth { bearer },
    ))
}
