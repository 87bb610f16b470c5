//! Health of the peers a service cannot serve without: a background probe calls each required
//! peer's `grpc.health.v1.Health/Check` every [`PROBE_EVERY`] and, while one of them does not
//! answer `SERVING`, reports the service's own gRPC services (e.g.
//! `billing.reseller.v1.ResellerBilling`) `NOT_SERVING`; `SERVING` again once every required
//! peer answers.
//!
//! The server's overall status (service `""`) is left alone: it says whether the process
//! itself serves, and is what liveness probes restart on (restarting a caller does not bring
//! its peer back). A load balancer or an operator that wants to route around a caller whose
//! peer is down checks the named service. Which peers are required is the service's
//! declaration ([`crate::config::PeerSpec::required`]): reseller-billing's wallet is;
//! subscription's is not (only its credit grants need it, and they wait).

use std::{collections::BTreeMap, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_check_response, health_client::HealthClient},
    server::HealthReporter,
};

use crate::{
    client::{PeerChannel, PeerTransport, peer_channel},
    config::{PeerConfig, ServiceConfig, ServiceDefaults},
};

/// How often each required peer is probed. With [`PROBE_TIMEOUT`], a peer that goes down is
/// reported within about two seconds.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long one probe waits for the peer's answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The configured peers that `defaults` declares required.
pub fn required_peers<'a>(
    defaults: &ServiceDefaults,
    config: &'a ServiceConfig,
) -> Vec<&'a PeerConfig> {
    defaults
        .peers
        .iter()
        .filter(|spec| spec.required)
        .filter_map(|spec| config.peers.get(spec.name))
        .collect()
}

/// Starts the probe of `peers` (if any), setting `services` on `reporter`; it ends on
/// `shutdown`.
pub fn spawn_peer_probe(
    peers: Vec<PeerConfig>,
    services: &'static [&'static str],
    reporter: HealthReporter,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if peers.is_empty() {
        return None;
    }
    Some(tokio::spawn(async move {
        // One channel per peer, kept while it answers and built anew after a failure, so a
        // peer that comes back on a new connection is seen at once.
        let mut channels: BTreeMap<String, PeerChannel> = BTreeMap::new();
        let mut serving = true;
        loop {
            let mut down = Vec::new();
            for peer in &peers {
                if let Err(reason) = probe(peer, &mut channels).await {
                    channels.remove(&peer.name);
                    down.push(reason);
                }
            }
            match (serving, down.is_empty()) {
                (true, false) => {
                    tracing::warn!(
                        down = %down.join("; "),
                        "a required peer is unreachable: NOT_SERVING"
                    );
                    set_all(&reporter, services, ServingStatus::NotServing).await;
                    serving = false;
                }
                (false, true) => {
                    tracing::info!("every required peer answers again: SERVING");
                    set_all(&reporter, services, ServingStatus::Serving).await;
                    serving = true;
                }
                _ => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
    }))
}

async fn set_all(
    reporter: &HealthReporter,
    services: &'static [&'static str],
    status: ServingStatus,
) {
    for name in services {
        reporter.set_service_status(*name, status).await;
    }
}

/// `Ok` when `peer` answers `SERVING`; otherwise why not, naming the peer.
async fn probe(
    peer: &PeerConfig,
    channels: &mut BTreeMap<String, PeerChannel>,
) -> Result<(), String> {
    let channel = match channels.get(&peer.name) {
        Some(c) => c.clone(),
        None => {
            let c = peer_channel(peer, PROBE_TIMEOUT)
                .map_err(|e| format!("{}: {e:#}", PeerTransport::describe(peer)))?;
            channels.insert(peer.name.clone(), c.clone());
            c
        }
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(PROBE_TIMEOUT * 2, check).await {
        Ok(Ok(answer))
            if answer.get_ref().status == health_check_response::ServingStatus::Serving as i32 =>
        {
            Ok(())
        }
        Ok(Ok(answer)) => Err(format!(
            "{} answers {:?}",
            PeerTransport::describe(peer),
            health_check_response::ServingStatus::try_from(answer.get_ref().status)
                .unwrap_or(health_check_response::ServingStatus::Unknown)
        )),
        // The transport names the peer already (`client::PeerTransport`).
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err(format!(
            "{} did not answer its health check within {:?}",
            PeerTransport::describe(peer),
            PROBE_TIMEOUT * 2
        )),
    }
}
