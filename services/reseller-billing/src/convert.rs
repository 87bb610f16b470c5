//! Conversions between the reseller's records and protobuf messages, by hand.

use prost::Message;
use proto::{common::v1::Money as PbMoney, reseller::v1 as pb, wallet::v1 as wpb};
use shared::{Money, TierTable};

use crate::{
    domain::{BillingMode, Funding, Payer, Usage},
    error::ResellerError,
    model::{
        Allocation, CustomerPage, CustomerRecord, CustomerView, Outcome, PartnerRecord,
        PartnerView, RoutedHold, RoutedRecord, Statement,
    },
};

pub use runtime::convert::Reply;

impl Reply for PartnerView {
    type Message = pb::Partner;
    fn to_message(&self) -> pb::Partner {
        partner_message(
            &self.partner,
            self.wallet.clone(),
            self.resale_prices.as_ref(),
        )
    }
}

impl Reply for CustomerView {
    type Message = pb::Customer;
    fn to_message(&self) -> pb::Customer {
        customer_message(&self.customer, self.used_this_month)
    }
}

impl Reply for CustomerPage {
    type Message = pb::ListCustomersResponse;
    fn to_message(&self) -> pb::ListCustomersResponse {
        pb::ListCustomersResponse {
            customers: self.customers.iter().map(Reply::to_message).collect(),
            next_page_token: self.next_page_token.clone(),
        }
    }
}

impl Reply for Allocation {
    type Message = pb::Allocation;
    fn to_message(&self) -> pb::Allocation {
        pb::Allocation {
            customer_id: self.customer_id.clone(),
            credits: self.transfer.credits,
            partner_wallet: self.transfer.from_wallet.clone(),
            customer_wallet: self.transfer.to_wallet.clone(),
        }
    }
}

impl Reply for RoutedHold {
    type Message = pb::RoutedReservation;
    fn to_message(&self) -> pb::RoutedReservation {
        routed_reservation(&self.routed, self.reservation.clone())
    }
}

impl Reply for Statement {
    type Message = pb::UsageStatement;
    fn to_message(&self) -> pb::UsageStatement {
        pb::UsageStatement {
            partner_id: self.partner_id.clone(),
            year: self.year,
            month: self.month,
            customers: self
                .customers
                .iter()
                .map(|l| customer_usage(l.customer_id.clone(), &l.usage, l.amount.as_ref()))
                .collect(),
            total: self.total.as_ref().map(money),
        }
    }
}

/// A message as stored in a text column: its protobuf encoding in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// A message stored by [`hex`] (a partner's pricing and rating).
pub fn decode_stored<M: Message + Default>(hex_text: &str) -> Result<M, ResellerError> {
    unhex(hex_text)
        .and_then(|b| M::decode(b.as_slice()).ok())
        .ok_or_else(|| runtime::db::DbError::Corrupt("stored protobuf".into()).into())
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Money as its message.
pub fn money(m: &Money) -> PbMoney {
    runtime::convert::money(m)
}

/// A request's billing mode.
pub fn billing_mode_from(v: i32) -> Result<BillingMode, ResellerError> {
    match pb::BillingMode::try_from(v) {
        Ok(pb::BillingMode::PartnerPays) => Ok(BillingMode::PartnerPays),
        Ok(pb::BillingMode::CustomerPays) => Ok(BillingMode::CustomerPays),
        _ => Err(ResellerError::invalid(
            "billing_mode",
            "must be BILLING_MODE_PARTNER_PAYS or BILLING_MODE_CUSTOMER_PAYS",
        )),
    }
}

fn billing_mode(m: BillingMode) -> pb::BillingMode {
    match m {
        BillingMode::PartnerPays => pb::BillingMode::PartnerPays,
        BillingMode::CustomerPays => pb::BillingMode::CustomerPays,
    }
}

/// A request's partner funding.
pub fn funding_from(v: i32) -> Result<Funding, ResellerError> {
    match pb::PartnerFunding::try_from(v) {
        Ok(pb::PartnerFunding::Prepaid) => Ok(Funding::Prepaid),
        Ok(pb::PartnerFunding::OnDemand) => Ok(Funding::OnDemand),
        _ => Err(ResellerError::invalid(
            "funding",
            "must be PARTNER_FUNDING_PREPAID or _ON_DEMAND",
        )),
    }
}

fn funding(f: Funding) -> pb::PartnerFunding {
    match f {
        Funding::Prepaid => pb::PartnerFunding::Prepaid,
        Funding::OnDemand => pb::PartnerFunding::OnDemand,
    }
}

/// The funding mode of a partner's main wallet at the credits-wallet service.
pub fn wallet_funding(f: Funding) -> wpb::FundingMode {
    match f {
        Funding::Prepaid => wpb::FundingMode::Prepaid,
        Funding::OnDemand => wpb::FundingMode::OnDemand,
    }
}

fn payer(p: Payer) -> pb::Payer {
    match p {
        Payer::Partner => pb::Payer::Partner,
        Payer::Customer => pb::Payer::Customer,
    }
}

/// A partner with its main wallet as the wallet service shows it.
fn partner_message(
    p: &PartnerRecord,
    wallet: wpb::Wallet,
    resale: Option<&TierTable>,
) -> pb::Partner {
    pb::Partner {
        partner_id: p.partner_id.clone(),
        currency: p.currency.code().into(),
        funding: funding(p.funding) as i32,
        payment_method: p.payment_method.clone(),
        wallet_id: p.wallet_id.clone(),
        wallet: Some(wallet),
        resale_prices: resale.map(runtime::convert::tier_table_message),
    }
}

/// A customer, with the partner credits it `used` this month.
fn customer_message(c: &CustomerRecord, used: i64) -> pb::Customer {
    pb::Customer {
        partner_id: c.partner_id.clone(),
        customer_id: c.customer_id.clone(),
        billing_mode: billing_mode(c.billing_mode) as i32,
        suspended: c.suspended,
        monthly_credit_limit: u(c.monthly_limit),
        credits_used_this_month: u(used),
        wallet_id: c.wallet_id.clone(),
    }
}

/// The answer of a routed send the wallet carried out (`routed` as completed): a
/// `RoutedCharge` or a `RoutedReservation`, encoded as it is sent and recorded under the key.
pub fn send_answer(routed: &RoutedRecord, recipients: u64, outcome: Outcome) -> Vec<u8> {
    match outcome {
        Outcome::Charged(charge) => routed_charge(routed, recipients, charge).encode_to_vec(),
        Outcome::Held(reservation) => routed_reservation(routed, reservation).encode_to_vec(),
    }
}

/// A routed charge's answer, the wallet's `charge` of `recipients` inside.
fn routed_charge(
    routed: &RoutedRecord,
    recipients: u64,
    charge: wpb::MailingCharge,
) -> pb::RoutedCharge {
    pb::RoutedCharge {
        payer: payer(routed.payer) as i32,
        payer_wallet_id: routed.payer_wallet_id.clone(),
        customer_id: routed.customer_id.clone(),
        mailing_id: routed.mailing_id.clone(),
        recipients,
        credits: charge.credits,
        payer_balance_after: charge.balance_after,
        charge: Some(charge),
    }
}

/// A routed hold's answer, the wallet's `reservation` inside.
fn routed_reservation(
    routed: &RoutedRecord,
    reservation: wpb::Reservation,
) -> pb::RoutedReservation {
    pb::RoutedReservation {
        payer: payer(routed.payer) as i32,
        payer_wallet_id: routed.payer_wallet_id.clone(),
        customer_id: routed.customer_id.clone(),
        reservation: Some(reservation),
    }
}

/// One customer's line of a usage statement.
fn customer_usage(customer_id: String, usage: &Usage, amount: Option<&Money>) -> pb::CustomerUsage {
    pb::CustomerUsage {
        customer_id,
        mailings: u(usage.mailings),
        recipients: u(usage.recipients),
        credits_used: u(usage.credits()),
        partner_paid_credits: u(usage.partner_paid),
        customer_paid_credits: u(usage.customer_paid),
        amount: amount.map(money),
    }
}
