//! Bearer-token authentication and per-RPC scopes, as a tower layer in front of every service.
//!
//! Health and reflection stay open; every other RPC needs `authorization: Bearer <token>` with a
//! token from the service's configured list (`UNAUTHENTICATED` otherwise) that carries the scope
//! the method requires (`PERMISSION_DENIED` otherwise). A method missing from the service's scope
//! table requires `admin`, so a new RPC is closed until someone decides who may call it. Tokens
//! are compared as SHA-256 digests in constant time and never logged; the caller's name is.

use std::{
    collections::HashMap,
    fmt,
    str::FromStr,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, FutureExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Read state (get, list, watch).
    Read,
    /// Change state (charge, subscribe, ...).
    Mutate,
    /// Operator actions (adjustments, test clock, verification).
    Admin,
    /// Act on behalf of an end user, passing the user's identity (rule S5).
    ActForUser,
}

impl Scope {
    /// The scope's configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Mutate => "mutate",
            Scope::Admin => "admin",
            Scope::ActForUser => "act-for-user",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "read" => Ok(Scope::Read),
            "mutate" => Ok(Scope::Mutate),
            "admin" => Ok(Scope::Admin),
            "act-for-user" => Ok(Scope::ActForUser),
            _ => Err(()),
        }
    }
}

/// One bearer token that may call the service, with its scopes.
#[derive(Clone, Deserialize)]
pub struct TokenConfig {
    /// Who holds the token (appears in logs instead of the secret).
    pub name: String,
    /// The secret itself; never logged.
    pub token: String,
    /// What the holder may do.
    pub scopes: Vec<Scope>,
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// The authenticated caller, put into the request's extensions for handlers.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's configured name.
    pub name: Arc<str>,
    /// The token's scopes.
    pub scopes: Arc<[Scope]>,
}

impl Principal {
    /// Whether the caller holds `scope`.
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// The accepted tokens, kept only as digests.
#[derive(Clone)]
pub struct TokenRegistry {
    entries: Arc<[([u8; 32], Principal)]>,
}

impl TokenRegistry {
    /// Builds the registry from configuration.
    pub fn new(tokens: &[TokenConfig]) -> Self {
        let entries = tokens
            .iter()
            .map(|t| {
                (
                    digest(&t.token),
                    Principal {
                        name: t.name.as_str().into(),
                        scopes: t.scopes.clone().into(),
                    },
                )
            })
            .collect::<Vec<_>>();
        Self {
            entries: entries.into(),
        }
    }

    /// The principal holding `token`, comparing every entry in constant time.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let presented = digest(token);
        let mut found = None;
        for (d, principal) in self.entries.iter() {
            if bool::from(d.ct_eq(&presented)) {
                found = Some(principal.clone());
            }
        }
        found
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Which scope each RPC of a service requires, keyed by the full path
/// `/package.Service/Method`.
#[derive(Debug, Clone, Default)]
pub struct MethodScopes {
    map: HashMap<String, Scope>,
}

impl MethodScopes {
    /// An empty table (every business RPC then requires `admin`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires `scope` for `method` of `service` (`billing.wallet.v1.CreditsWallet`).
    pub fn require(mut self, service: &str, method: &str, scope: Scope) -> Self {
        self.map.insert(format!("/{service}/{method}"), scope);
        self
    }

    /// The scope a path requires: the table's entry, or `admin` for anything not listed.
    pub fn required(&self, path: &str) -> Scope {
        self.map.get(path).copied().unwrap_or(Scope::Admin)
    }

    /// Every path listed.
    pub fn paths(&self) -> impl Iterator<Item = (&str, Scope)> {
        self.map.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// Paths that need no token: health checks and reflection.
fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.")
        || path.starts_with("/grpc.reflection.v1.")
        || path.starts_with("/grpc.reflection.v1alpha.")
}

/// The tower layer that authenticates and authorizes every call.
#[derive(Clone)]
pub struct AuthLayer {
    registry: TokenRegistry,
    scopes: Arc<MethodScopes>,
}

impl AuthLayer {
    /// A layer accepting `registry`'s tokens with the scopes of `scopes`.
    pub fn new(registry: TokenRegistry, scopes: MethodScopes) -> Self {
        Self {
            registry,
            scopes: Arc::new(scopes),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S> Auth<S> {
    fn check(&self, req: &http::Request<Body>) -> Result<Option<Principal>, Status> {
        let path = req.uri().path();
        if is_open(path) {
            return Ok(None);
        }
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err(Status::unauthenticated(
                "missing bearer token: send metadata `authorization: Bearer <token>`",
            ));
        };
        let Some(principal) = self.layer.registry.authenticate(token.trim()) else {
            return Err(Status::unauthenticated("unknown bearer token"));
        };
        let required = self.layer.scopes.required(path);
        if !principal.has(required) {
            tracing::warn!(caller = %principal.name, %path, %required, "call refused: missing scope");
            return Err(Status::permission_denied(format!(
                "token {:?} lacks the {required} scope that {path} requires",
                principal.name
            )));
        }
        Ok(Some(principal))
    }
}

impl<S, ResBody> Service<http::Request<Body>> for Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        match self.check(&req) {
            Ok(principal) => {
                if let Some(p) = principal {
                    tracing::Span::current().record("caller", &*p.name);
                    req.extensions_mut().insert(p);
                }
                self.inner.call(req).boxed()
            }
            Err(status) => futures::future::ready(Ok(status.into_http())).boxed(),
        }
    }
}

/// The caller of a request, as established by [`AuthLayer`].
pub fn principal<T>(req: &tonic::Request<T>) -> Result<&Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn registry_finds_the_token_and_nothing_else() {
        let reg = TokenRegistry::new(&[TokenConfig {
            name: "pipeline".into(),
            token: "pipeline-secret".into(),
            scopes: vec![Scope::Read, Scope::Mutate],
        }]);
        let p = reg.authenticate("pipeline-secret").unwrap();
        assert_eq!(&*p.name, "pipeline");
        assert!(p.has(Scope::Mutate));
        assert!(!p.has(Scope::Admin));
        assert!(reg.authenticate("pipeline-secreT").is_none());
        assert!(reg.authenticate("").is_none());
    }

    #[test]
    fn unlisted_methods_require_admin_and_open_paths_are_open() {
        let scopes = MethodScopes::new().require("a.B", "Get", Scope::Read);
        assert_eq!(scopes.required("/a.B/Get"), Scope::Read);
        assert_eq!(scopes.required("/a.B/New"), Scope::Admin);
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open("/a.B/Get"));
    }
}
