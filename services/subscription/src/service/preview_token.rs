//! The signed preview token ApplyChange checks (S6).

use crate::{error::SubError, store};

use super::Subscriptions;

type TokenMac = hmac::Hmac<sha2::Sha256>;

/// Bytes of the MAC a token carries (128 bits; a token stays well within the 128 characters
/// of an id).
const TOKEN_TAG_BYTES: usize = 16;

/// What a token that does not decode or verify is told (INVALID_ARGUMENT, unlike a genuine
/// but outdated one, which is FAILED_PRECONDITION "stale").
const MALFORMED_TOKEN: &str =
    "preview token is malformed or was not issued by this service for this account";

impl Subscriptions {
    pub(super) async fn token_mac(
        &self,
        account_id: &str,
        body: &str,
    ) -> Result<TokenMac, SubError> {
        use hmac::Mac;
        let key = self
            .token_key
            .get_or_try_init(|| async {
                let mut conn = self.conn().await?;
                Ok::<_, SubError>(store::preview_token_key(&mut conn).await?.into_bytes())
            })
            .await?;
        let mut mac = TokenMac::new_from_slice(key)
            .map_err(|e| SubError::Arithmetic(format!("preview token key: {e}")))?;
        mac.update(account_id.as_bytes());
        mac.update(b":");
        mac.update(body.as_bytes());
        Ok(mac)
    }

    /// `body.signature`: the body (`revision.at_micros.amount_minor`) signed for the account
    /// (HMAC-SHA256's first [`TOKEN_TAG_BYTES`], hex), so a token cannot be edited or moved
    /// to another account.
    pub(super) async fn sign_token(
        &self,
        account_id: &str,
        body: &str,
    ) -> Result<String, SubError> {
        use hmac::Mac;
        let tag = self
            .token_mac(account_id, body)
            .await?
            .finalize()
            .into_bytes();
        let hex: String = tag
            .iter()
            .take(TOKEN_TAG_BYTES)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(format!("{body}.{hex}"))
    }

    /// The body of a token this service signed for `account_id`, or INVALID_ARGUMENT.
    pub(super) async fn verify_token(
        &self,
        account_id: &str,
        token: &str,
    ) -> Result<(i64, i64, i64), SubError> {
        use hmac::Mac;
        let bad = || SubError::invalid("preview_token", MALFORMED_TOKEN);
        let (body, hex) = token.rsplit_once('.').ok_or_else(bad)?;
        let tag = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .filter(|t| t.len() == TOKEN_TAG_BYTES)
            .ok_or_else(bad)?;
        self.token_mac(account_id, body)
            .await?
            .verify_truncated_left(&tag)
            .map_err(|_| bad())?;
        parse_token(body)
    }
}

/// `revision.at_micros.amount_minor`, the body of a verified token.
fn parse_token(token: &str) -> Result<(i64, i64, i64), SubError> {
    let bad = || SubError::invalid("preview_token", MALFORMED_TOKEN);
    let mut parts = token.split('.');
    let mut next =
        || -> Result<i64, SubError> { parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad) };
    let t = (next()?, next()?, next()?);
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(t)
}
