//! `billing.wallet.v1.CreditsWallet`: validates requests into typed commands, calls the use
//! cases, maps errors to status codes. No business rule lives here.

use chrono::{DateTime, Utc};
use proto::{
    common::v1::{Event, WatchEventsRequest},
    wallet::v1::{self as pb, credits_wallet_server::CreditsWallet},
};
use runtime::convert::{answer, id, recipients, reply as ok, text, view};
use runtime::{Platform, idempotency::IdempotencyKey, payments::PaymentProvider};
use shared::Currency;
use shared::limits::{self, quoted};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    convert,
    domain::{self, MAX_CREDITS},
    error::WalletError,
    service::{
        Wallets,
        group_commit::GroupCommit,
        send_rules::{DEFAULT_HOLD_TTL_SECONDS, MAX_HOLD_TTL_SECONDS, Spend},
        wallets::OpenWallet,
    },
    verify,
};

/// The gRPC face of the service.
pub struct CreditsWalletApi {
    platform: Platform,
    wallets: Wallets,
    /// What sends and captures try first (`None`: each runs alone).
    group_commit: Option<GroupCommit>,
}

impl CreditsWalletApi {
    /// Serves `wallets` on `platform`, sends and captures through `group_commit` when given.
    pub fn new(platform: Platform, wallets: Wallets, group_commit: Option<GroupCommit>) -> Self {
        Self {
            platform,
            wallets,
            group_commit,
        }
    }
}

fn credits(field: &'static str, value: u64) -> Result<i64, WalletError> {
    let v = i64::try_from(value).unwrap_or(i64::MAX);
    Ok(domain::positive_credits(field, v)?)
}

fn currency(value: &str) -> Result<Currency, WalletError> {
    value.parse().map_err(|_| {
        WalletError::invalid(
            "currency",
            format!(
                "{} is not a supported ISO-4217 code (EUR, USD, GBP, CHF, SEK, DKK, NOK, PLN, JPY)",
                quoted(value)
            ),
        )
    })
}

/// A payment-method token the configured provider can charge (`payment_provider`: the
/// simulator's tokens, or Stripe's `cus_...:pm_...`).
fn payment_method(
    provider: PaymentProvider,
    field: &'static str,
    value: &str,
) -> Result<(), WalletError> {
    if !value.is_empty() && provider.method_kind(value).is_none() {
        return Err(WalletError::invalid(
            field,
            format!(
                "{} is not a payment method the gateway knows ({})",
                quoted(value),
                provider.expected_tokens()
            ),
        ));
    }
    Ok(())
}

fn instant(
    field: &'static str,
    t: Option<&prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, WalletError> {
    t.map(|t| runtime::convert::instant(t, field))
        .transpose()
        .map_err(|s| WalletError::invalid(field, s.message().to_string()))
}

#[tonic::async_trait]
impl CreditsWallet for CreditsWalletApi {
    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn open_wallet(
        &self,
        req: Request<pb::OpenWalletRequest>,
    ) -> Result<Response<pb::Wallet>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("OpenWallet", &r.idempotency_key, &r)?;
        let cmd = (|| {
            let currency = currency(&r.currency)?;
            let signup_credits = if r.signup_credits == 0 {
                0
            } else {
                credits("signup_credits", r.signup_credits)?
            };
            Ok::<_, WalletError>(OpenWallet {
                wallet_id: id("wallet_id", &r.wallet_id)?.to_string(),
                currency,
                pricing: convert::pricing_from(r.pricing.as_ref(), currency)?,
                rating: convert::rating_from(r.rating.as_ref())?,
                signup_credits,
                signup_expires_at: instant(
                    "signup_credits_expire_at",
                    r.signup_credits_expire_at.as_ref(),
                )?,
            })
        })()?;
        if cmd
            .signup_expires_at
            .is_some_and(|t| t <= self.platform.clock.now())
        {
            return Err(
                WalletError::invalid("signup_credits_expire_at", "must be in the future").into(),
            );
        }
        answer(self.wallets.open_wallet(&key, cmd).await)
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn get_wallet(
        &self,
        req: Request<pb::GetWalletRequest>,
    ) -> Result<Response<pb::Wallet>, Status> {
        let r = req.into_inner();
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        view(self.wallets.get_wallet(wallet_id).await)
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn quote_credit_purchase(
        &self,
        req: Request<pb::QuoteCreditPurchaseRequest>,
    ) -> Result<Response<pb::CreditQuote>, Status> {
        let r = req.into_inner();
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let n = credits("credits", r.credits)?;
        view(self.wallets.quote(wallet_id, n).await)
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn purchase_credits(
        &self,
        req: Request<pb::PurchaseCreditsRequest>,
    ) -> Result<Response<pb::Purchase>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("PurchaseCredits", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let n = credits("credits", r.credits)?;
        payment_method(
            self.platform.config.payment_provider,
            "payment_method",
            &r.payment_method,
        )?;
        let expires_at = instant("expires_at", r.expires_at.as_ref())?;
        let expected = r
            .expected_amount
            .as_ref()
            .map(|m| limits::parse_amount("expected_amount", &m.amount, &m.currency))
            .transpose()
            .map_err(WalletError::from)?;
        answer(
            self.wallets
                .purchase(&key, wallet_id, n, &r.payment_method, expires_at, expected)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn grant_credits(
        &self,
        req: Request<pb::GrantCreditsRequest>,
    ) -> Result<Response<pb::WalletChange>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("GrantCredits", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let n = credits("credits", r.credits)?;
        let kind = convert::grant_kind(r.kind)?;
        let expires_at = instant("expires_at", r.expires_at.as_ref())?;
        text("reference", &r.reference, limits::MAX_REFERENCE_LEN, false)?;
        answer(
            self.wallets
                .grant(&key, wallet_id, kind, n, expires_at, &r.reference)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn rate_mailing(
        &self,
        req: Request<pb::RateMailingRequest>,
    ) -> Result<Response<pb::MailingRating>, Status> {
        let r = req.into_inner();
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        view(self.wallets.rate(wallet_id, r.recipients).await)
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id, mailing = %req.get_ref().mailing_id))]
    async fn charge_mailing(
        &self,
        req: Request<pb::ChargeMailingRequest>,
    ) -> Result<Response<pb::MailingCharge>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("ChargeMailing", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let spend = Spend::Charge {
            mailing_id: id("mailing_id", &r.mailing_id)?.to_string(),
            recipients: recipients("recipients", r.recipients, false)?,
        };
        ok(self
            .wallets
            .spend(self.group_commit.as_ref(), &key, wallet_id, spend)
            .await
            .and_then(convert::mailing_charge_answer))
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id, mailing = %req.get_ref().mailing_id))]
    async fn reserve_credits(
        &self,
        req: Request<pb::ReserveCreditsRequest>,
    ) -> Result<Response<pb::Reservation>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("ReserveCredits", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let ttl_seconds = match r.ttl_seconds {
            0 => DEFAULT_HOLD_TTL_SECONDS,
            t if t > MAX_HOLD_TTL_SECONDS => {
                return Err(
                    WalletError::invalid("ttl_seconds", "at most 30 days (2592000)").into(),
                );
            }
            t => t,
        };
        let spend = Spend::Hold {
            mailing_id: id("mailing_id", &r.mailing_id)?.to_string(),
            recipients: recipients("recipients", r.recipients, false)?,
            ttl_seconds,
        };
        ok(self
            .wallets
            .spend(self.group_commit.as_ref(), &key, wallet_id, spend)
            .await
            .and_then(convert::reservation_answer))
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id, reservation = %req.get_ref().reservation_id))]
    async fn capture_reservation(
        &self,
        req: Request<pb::CaptureReservationRequest>,
    ) -> Result<Response<pb::Reservation>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("CaptureReservation", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let reservation_id = id("reservation_id", &r.reservation_id)?;
        recipients("recipients_sent", r.recipients_sent, true)?;
        ok(self
            .wallets
            .capture(
                self.group_commit.as_ref(),
                &key,
                wallet_id,
                reservation_id,
                r.recipients_sent,
            )
            .await
            .and_then(convert::reservation_answer))
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id, reservation = %req.get_ref().reservation_id))]
    async fn release_reservation(
        &self,
        req: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::Reservation>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("ReleaseReservation", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let reservation_id = id("reservation_id", &r.reservation_id)?;
        answer(self.wallets.release(&key, wallet_id, reservation_id).await)
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn configure_auto_top_up(
        &self,
        req: Request<pb::ConfigureAutoTopUpRequest>,
    ) -> Result<Response<pb::Wallet>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("ConfigureAutoTopUp", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let top_up = convert::auto_top_up_from(r.auto_top_up.as_ref())?;
        payment_method(
            self.platform.config.payment_provider,
            "payment_method",
            &r.payment_method,
        )?;
        answer(
            self.wallets
                .configure_auto_top_up(&key, wallet_id, top_up, &r.payment_method)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn configure_low_balance_reminder(
        &self,
        req: Request<pb::ConfigureLowBalanceReminderRequest>,
    ) -> Result<Response<pb::Wallet>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("ConfigureLowBalanceReminder", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let threshold = match r.threshold {
            0 => None,
            t => Some(credits("threshold", t)?),
        };
        answer(
            self.wallets
                .configure_reminder(&key, wallet_id, threshold)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn set_funding_mode(
        &self,
        req: Request<pb::SetFundingModeRequest>,
    ) -> Result<Response<pb::Wallet>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("SetFundingMode", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let mode = convert::funding_from(r.funding_mode)?;
        payment_method(
            self.platform.config.payment_provider,
            "payment_method",
            &r.payment_method,
        )?;
        answer(
            self.wallets
                .set_funding_mode(&key, wallet_id, mode, &r.payment_method)
                .await,
        )
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn adjust_credits(
        &self,
        req: Request<pb::AdjustCreditsRequest>,
    ) -> Result<Response<pb::WalletChange>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("AdjustCredits", &r.idempotency_key, &r)?;
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        if r.delta == 0 || r.delta.unsigned_abs() > MAX_CREDITS.unsigned_abs() {
            return Err(WalletError::invalid(
                "delta",
                format!("must be non-zero and at most {MAX_CREDITS} either way"),
            )
            .into());
        }
        let reason = text("reason", r.reason.trim(), limits::MAX_REASON_LEN, true)?;
        answer(self.wallets.adjust(&key, wallet_id, r.delta, reason).await)
    }

    #[tracing::instrument(skip_all, fields(from = %req.get_ref().from_wallet_id, to = %req.get_ref().to_wallet_id))]
    async fn transfer_credits(
        &self,
        req: Request<pb::TransferCreditsRequest>,
    ) -> Result<Response<pb::CreditTransfer>, Status> {
        let r = req.into_inner();
        let key = IdempotencyKey::new("TransferCredits", &r.idempotency_key, &r)?;
        let from = id("from_wallet_id", &r.from_wallet_id)?;
        let to = id("to_wallet_id", &r.to_wallet_id)?;
        if from == to {
            return Err(
                WalletError::invalid("to_wallet_id", "must differ from from_wallet_id").into(),
            );
        }
        let n = credits("credits", r.credits)?;
        text("reason", &r.reason, limits::MAX_REASON_LEN, false)?;
        answer(self.wallets.transfer(&key, from, to, n, &r.reason).await)
    }

    #[tracing::instrument(skip_all, fields(wallet = %req.get_ref().wallet_id))]
    async fn list_ledger_entries(
        &self,
        req: Request<pb::ListLedgerEntriesRequest>,
    ) -> Result<Response<pb::ListLedgerEntriesResponse>, Status> {
        let r = req.into_inner();
        let wallet_id = id("wallet_id", &r.wallet_id)?;
        let page_size = match r.page_size {
            0 => 100,
            n if n > 500 => return Err(WalletError::invalid("page_size", "at most 500").into()),
            n => i64::from(n),
        };
        let after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    WalletError::invalid("page_token", "is not a token from a previous page")
                })?
        };
        view(self.wallets.ledger(wallet_id, after, page_size).await)
    }

    #[tracing::instrument(skip_all)]
    async fn verify_ledger(
        &self,
        req: Request<pb::VerifyLedgerRequest>,
    ) -> Result<Response<pb::VerifyLedgerResponse>, Status> {
        let r = req.into_inner();
        let options = verify::Options {
            now: self.platform.clock.now(),
            outbox_grace: match r.outbox_grace_seconds {
                0 => verify::DEFAULT_OUTBOX_GRACE,
                s => std::time::Duration::from_secs(u64::from(s)),
            },
        };
        let db = &self.platform.db;
        let report = verify::verify(db.pool(), db.backend(), &options)
            .await
            .map_err(WalletError::from)?;
        if report.is_clean() {
            tracing::info!(
                wallets = report.wallets_checked,
                entries = report.entries_checked,
                "ledger verified: no violation"
            );
        } else {
            tracing::error!(
                wallets = report.wallets_checked,
                violations = report.violations_total,
                "ledger verification found violations"
            );
        }
        Ok(Response::new(convert::verify_report(&report)))
    }

    type WatchEventsStream = ReceiverStream<Result<Event, Status>>;

    #[tracing::instrument(skip_all, fields(after = req.get_ref().after_cursor))]
    async fn watch_events(
        &self,
        req: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Ok(Response::new(
            self.platform
                .outbox
                .watch(req.into_inner(), self.platform.shutdown.clone()),
        ))
    }
}
