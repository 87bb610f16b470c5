//! The services a service calls: as it declares them ([`PeerSpec`]) and as configured
//! ([`PeerConfig`], from `[peers.<name>]` or `{PREFIX}_PEER_<NAME>_URL`, `_TOKEN`, `_CA_PATH`).

use std::{collections::BTreeMap, fmt, path::PathBuf};

use serde::Deserialize;

use super::{ConfigError, ServiceConfig, ServiceDefaults};

/// A service that another calls, as the caller declares it.
#[derive(Debug, Clone, Copy)]
pub struct PeerSpec {
    /// Its name in the configuration: `wallet` is `[peers.wallet]` or
    /// `{PREFIX}_PEER_WALLET_URL`.
    pub name: &'static str,
    /// The service it is (`credits-wallet`), named in errors and logs.
    pub service: &'static str,
    /// The caller cannot serve without it: while it is unreachable, the caller's own gRPC
    /// services report `NOT_SERVING` on `grpc.health.v1` (see [`crate::health`]).
    pub required: bool,
}

/// Another service this one calls over gRPC.
#[derive(Clone, Deserialize)]
pub struct PeerConfig {
    /// Its name in this configuration (`wallet`); set by the loader from the key.
    #[serde(skip)]
    pub name: String,
    /// The service it is (`credits-wallet`, from [`PeerSpec::service`]; the name for a peer the
    /// service does not declare); set by the loader.
    #[serde(skip)]
    pub service: String,
    /// e.g. `http://127.0.0.1:50051`.
    pub url: String,
    /// Bearer token presented to the peer; never logged.
    pub token: String,
    /// PEM file of the certificate authority that signed the peer's certificate; required for
    /// an `https://` URL (no system roots are trusted).
    #[serde(default)]
    pub ca_path: Option<PathBuf>,
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("service", &self.service)
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("ca_path", &self.ca_path)
            .finish()
    }
}

/// The file's peers with the environment's on top (`get` reads `{PREFIX}_{KEY}`), each named,
/// bound to the service it is and checked.
pub(super) fn resolve(
    defaults: &ServiceDefaults,
    file: BTreeMap<String, PeerConfig>,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, PeerConfig>, ConfigError> {
    let mut peers = file;
    for spec in defaults.peers {
        let name = &spec.name;
        let url = get(&format!("peer_{name}_url"));
        let token = get(&format!("peer_{name}_token"));
        let ca_path = get(&format!("peer_{name}_ca_path")).map(PathBuf::from);
        match (peers.get_mut(*name), url, token) {
            (Some(peer), url, token) => {
                if let Some(url) = url {
                    peer.url = url;
                }
                if let Some(token) = token {
                    peer.token = token;
                }
                if ca_path.is_some() {
                    peer.ca_path = ca_path;
                }
            }
            (None, Some(url), Some(token)) => {
                peers.insert(
                    (*name).to_string(),
                    PeerConfig {
                        name: String::new(),
                        service: String::new(),
                        url,
                        token,
                        ca_path,
                    },
                );
            }
            (None, None, None) => {}
            (None, _, _) => {
                return Err(ConfigError::Invalid {
                    key: format!("{}_PEER_{}_URL", defaults.env_prefix, name.to_uppercase()),
                    message: "set both the peer's URL and its token".into(),
                });
            }
        }
    }
    for (name, peer) in &mut peers {
        peer.name.clone_from(name);
        peer.service = defaults
            .peers
            .iter()
            .find(|p| p.name == name)
            .map_or_else(|| name.clone(), |p| p.service.to_string());
        if !(peer.url.starts_with("http://") || peer.url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                key: format!("peers.{name}.url"),
                message: format!("{:?} is not an http:// or https:// URL", peer.url),
            });
        }
        if peer.url.starts_with("https://") && peer.ca_path.is_none() {
            return Err(ConfigError::Invalid {
                key: format!("peers.{name}.ca_path"),
                message:
                    "an https:// peer needs the PEM file of the CA that signed its certificate"
                        .into(),
            });
        }
    }
    Ok(peers)
}

impl ServiceConfig {
    /// The peer named `name`, or a clear error naming the settings to add.
    pub fn peer(&self, name: &str) -> Result<&PeerConfig, ConfigError> {
        self.peers.get(name).ok_or_else(|| ConfigError::Invalid {
            key: format!("peers.{name}"),
            message: format!(
                "this service calls {name}: set peers.{name}.url and peers.{name}.token"
            ),
        })
    }
}
