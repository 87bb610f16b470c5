//! The payment provider (issue 17): `payment_provider` and Stripe's settings.

use std::path::PathBuf;

use super::{ConfigError, error::invalid};
use crate::{
    payments::PaymentProvider,
    stripe::{Secret, StripeSettings},
};

/// The payment settings as given (environment over file).
pub(super) struct PaymentSource {
    pub(super) provider: Option<String>,
    pub(super) api_base: Option<String>,
    pub(super) secret_key: Option<String>,
    pub(super) secret_key_file: Option<PathBuf>,
    pub(super) webhook_secret: Option<String>,
    pub(super) webhook_secret_file: Option<PathBuf>,
}

/// `payment_provider` and, for Stripe, its settings. The secret key comes from
/// `stripe_secret_key` or from the file `stripe_secret_key_file` names (one of them); Stripe
/// settings without `payment_provider = "stripe"` are refused rather than ignored. The API base
/// is `https://`, or `http://` on a loopback host only (a local Stripe such as localstripe), so
/// the key never crosses a network in clear.
pub(super) fn payment_settings(
    given: PaymentSource,
    env_key: &dyn Fn(&str) -> String,
) -> Result<(PaymentProvider, Option<StripeSettings>), ConfigError> {
    let provider = match given.provider.as_deref() {
        None => PaymentProvider::default(),
        Some(v) => v.parse().map_err(|()| ConfigError::Invalid {
            key: "payment_provider".into(),
            message: format!("{v:?} is not a provider: use simulator or stripe"),
        })?,
    };
    if provider != PaymentProvider::Stripe {
        for (key, set) in [
            ("stripe_api_base", given.api_base.is_some()),
            ("stripe_secret_key", given.secret_key.is_some()),
            ("stripe_secret_key_file", given.secret_key_file.is_some()),
            ("stripe_webhook_secret", given.webhook_secret.is_some()),
            (
                "stripe_webhook_secret_file",
                given.webhook_secret_file.is_some(),
            ),
        ] {
            if set {
                return Err(invalid(
                    key,
                    "applies to Stripe only: set payment_provider = \"stripe\" too",
                ));
            }
        }
        return Ok((provider, None));
    }
    let Some(secret) =
        secret_setting("stripe_secret_key", given.secret_key, given.secret_key_file)?
    else {
        return Err(invalid(
            "stripe_secret_key",
            &format!(
                "payment_provider = \"stripe\" needs the secret API key: set {} or {}",
                env_key("stripe_secret_key"),
                env_key("stripe_secret_key_file")
            ),
        ));
    };
    let webhook_secret = secret_setting(
        "stripe_webhook_secret",
        given.webhook_secret,
        given.webhook_secret_file,
    )?;
    if let Some(w) = &webhook_secret
        && !(w.starts_with("whsec_") && w.len() > 6 && w.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(invalid(
            "stripe_webhook_secret",
            "is not a webhook signing secret (whsec_..., no spaces)",
        ));
    }
    // The message never quotes the key.
    if !(secret.starts_with("sk_") || secret.starts_with("rk_"))
        || secret.len() < 8
        || !secret.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            "stripe_secret_key",
            "is not a Stripe secret or restricted key (sk_... or rk_..., no spaces)",
        ));
    }
    let api_base = given
        .api_base
        .unwrap_or_else(|| crate::stripe::DEFAULT_API_BASE.to_string());
    let url = reqwest::Url::parse(&api_base).map_err(|_| ConfigError::Invalid {
        key: "stripe_api_base".into(),
        message: format!("{api_base:?} is not a URL like https://api.stripe.com"),
    })?;
    let loopback = matches!(
        url.host_str(),
        Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
    );
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(ConfigError::Invalid {
                key: "stripe_api_base".into(),
                message: format!(
                    "{api_base:?} must be https:// (http:// only on 127.0.0.1 or localhost, for a local Stripe)"
                ),
            });
        }
    }
    Ok((
        provider,
        Some(StripeSettings {
            api_base,
            secret_key: Secret::new(secret),
            timeout: crate::stripe::DEFAULT_TIMEOUT,
            webhook_secret: webhook_secret.map(Secret::new),
        }),
    ))
}

/// A secret given as `key` or in the file `{key}_file` (not both), trimmed.
fn secret_setting(
    key: &str,
    value: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(invalid(key, &format!("set {key} or {key}_file, not both"))),
        (None, None) => Ok(None),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => Ok(Some(
            std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::Invalid {
                    key: format!("{key}_file"),
                    message: format!("cannot read {}: {e}", path.display()),
                })?
                .trim()
                .to_string(),
        )),
    }
}
