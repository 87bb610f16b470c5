//! Bearer tokens as the environment gives them, and the rules every token list obeys.

use super::{ConfigError, error::invalid};
use crate::auth::{Scope, TokenConfig};

/// Parses `name:secret:scope+scope,name2:secret2:scope`. Each entry is split at its last two
/// `:`, so a name may contain `:` (`partner:acme:secret:read+mutate` is the token named
/// `partner:acme`, bound to that partner by reseller-billing) and a secret may not; entries are
/// separated by `,`, which neither may contain. A secret with `:` or `,` goes in the file.
pub(super) fn parse_tokens(spec: &str) -> Result<Vec<TokenConfig>, ConfigError> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|entry| {
            let mut parts = entry.trim().rsplitn(3, ':');
            let (Some(scopes), Some(token), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(invalid(
                    "tokens",
                    "each entry must be name:secret:scope+scope (the name may contain ':', the secret may not; scopes: read, mutate, admin, act-for-user)",
                ));
            };
            let scopes = scopes
                .split('+')
                .map(|s| {
                    s.parse::<Scope>().map_err(|_| ConfigError::Invalid {
                        key: "tokens".into(),
                        message: format!(
                            "unknown scope {s:?} for token {name:?}; scopes are read, mutate, admin, act-for-user"
                        ),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(TokenConfig {
                name: name.to_string(),
                token: token.to_string(),
                scopes,
            })
        })
        .collect()
}

pub(super) fn validate_tokens(tokens: &[TokenConfig]) -> Result<(), ConfigError> {
    if tokens.is_empty() {
        return Err(invalid(
            "tokens",
            "no bearer tokens configured: every business RPC would be refused; set tokens in the config file or name:secret:scope+scope in the environment",
        ));
    }
    for t in tokens {
        if t.name.is_empty() {
            return Err(invalid("tokens", "a token has an empty name"));
        }
        if t.token.len() < 8 {
            return Err(ConfigError::Invalid {
                key: "tokens".into(),
                message: format!(
                    "the secret of token {:?} is shorter than 8 characters",
                    t.name
                ),
            });
        }
        if t.scopes.is_empty() {
            return Err(ConfigError::Invalid {
                key: "tokens".into(),
                message: format!("token {:?} has no scopes", t.name),
            });
        }
    }
    let mut secrets: Vec<&str> = tokens.iter().map(|t| t.token.as_str()).collect();
    secrets.sort_unstable();
    if secrets.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid("tokens", "two tokens share one secret"));
    }
    Ok(())
}
