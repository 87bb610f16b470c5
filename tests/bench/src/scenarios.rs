//! The scenarios of issue 7: setup (not timed), the timed load, and the correctness check.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use proto::{
    common::v1::{AdvanceTimeRequest, WatchEventsRequest, test_clock_client::TestClockClient},
    reseller::v1 as rs,
    subscription::v1 as sub,
    wallet::v1 as w,
};
use rs::reseller_billing_client::ResellerBillingClient;
use sub::{catalog_client::CatalogClient, subscriptions_client::SubscriptionsClient};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use w::credits_wallet_client::CreditsWalletClient;

use crate::{
    events,
    load::{self, Operation, Tally, pick, timed},
    pgstats,
    stack::{Auth, Backend, Memory, Stack, channels},
};

/// The scenarios, in the order they run.
pub const ALL: [&str; 6] = [
    "spread",
    "hot",
    "reseller-hot",
    "reserve-capture",
    "opens",
    "renewals",
];

/// What the command line chose.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seconds: u64,
    /// Wallets of `spread` and `reserve-capture`.
    pub wallets: usize,
    /// Customers of the partner in `reseller-hot`.
    pub customers: usize,
    /// Subscriptions renewed in `renewals`.
    pub renewals: usize,
    /// Overrides every scenario's number of concurrent callers.
    pub tasks: Option<usize>,
    /// After each load at full speed, the same load offered at half its throughput.
    pub half_rate: bool,
    /// Offers that second run at this many steps per second instead.
    pub rate: Option<u64>,
    /// The wallet delivers its events to a webhook receiver in the harness (`--webhook`).
    pub webhook: bool,
}

/// The result of one scenario on one backend.
pub struct Outcome {
    pub scenario: &'static str,
    pub backend: Backend,
    /// What the timed part did.
    pub what: String,
    pub tally: Tally,
    /// The same load offered open loop at half the throughput of `tally`: steps per second
    /// offered, and what the clients saw.
    pub half: Option<(u64, Tally)>,
    pub setup: Duration,
    /// Per service: name, memory before the load, memory at the end.
    pub memory: Vec<(&'static str, Memory, Memory)>,
    /// On PostgreSQL, what the server did from the start of the load to the end of the check.
    pub postgres: Option<pgstats::Activity>,
    /// The correctness check: Ok(summary) or Err(what is wrong).
    pub check: Result<String, String>,
    /// With `--webhook`: the wallet's events of the timed load, as the receiver saw them.
    pub events: Option<Result<events::Figures, String>>,
}

/// Each service's memory, and on PostgreSQL the server's counters, at one moment.
struct Sample {
    memory: Vec<(&'static str, Memory)>,
    postgres: Option<pgstats::Counters>,
}

async fn sample(stack: &Stack, backend: Backend) -> Sample {
    Sample {
        memory: memory(stack),
        postgres: match backend {
            Backend::Postgres => pgstats::read(&crate::stack::postgres_url()).await,
            Backend::Sqlite => None,
        },
    }
}

/// Credits each wallet starts with: far more than any run consumes.
const START_CREDITS: u64 = 1_000_000_000;
/// Recipients per mailing; at 1 credit per recipient, 10 credits per debit.
const RECIPIENTS: u64 = 10;
/// Upper bound of steps per task; the run's seconds are the real bound.
const MAX_STEPS: u64 = 1_000_000;
/// HTTP/2 connections the load is spread over.
const CHANNELS: usize = 4;
/// Concurrent calls of the untimed setup.
const SETUP_CONCURRENCY: usize = 64;

pub async fn run(name: &str, backend: Backend, settings: &Settings) -> anyhow::Result<Outcome> {
    let receiver = match settings.webhook {
        true => Some(events::Receiver::start().await?),
        false => None,
    };
    let stack = Stack::start(backend, receiver.as_ref()).await?;
    let result = run_on(name, backend, settings, &stack, receiver.as_ref()).await;
    if let Err(e) = stack.stop().await {
        // A failed clean-up leaves a schema behind; it does not change what was measured.
        eprintln!(
            "bench: cleaning up after {name} on {}: {e:#}",
            backend.name()
        );
    }
    result
}

async fn run_on(
    name: &str,
    backend: Backend,
    settings: &Settings,
    stack: &Stack,
    receiver: Option<&events::Receiver>,
) -> anyhow::Result<Outcome> {
    let auth = Auth::new(&stack.secret)?;
    let wallet_chans = channels(&stack.wallet.url(), CHANNELS).await?;
    let setup_started = Instant::now();
    let secs = Duration::from_secs(settings.seconds);
    let tasks = |default: usize| settings.tasks.unwrap_or(default);
    // The timed load at full speed; with a webhook, after the setup's events are delivered,
    // and followed by the wait for the load's own.
    let full = |n: usize, op: Operation| {
        let (chan, auth) = (wallet_chans[0].clone(), auth.clone());
        async move {
            let Some(rx) = receiver else {
                return (load::drive(n, secs, MAX_STEPS, op).await, None);
            };
            let mark = match events::before_load(&chan, &auth).await {
                Ok(m) => m,
                Err(e) => {
                    let tally = load::drive(n, secs, MAX_STEPS, op).await;
                    return (tally, Some(Err(format!("{e:#}"))));
                }
            };
            let tally = load::drive(n, secs, MAX_STEPS, op).await;
            let figures = events::after_load(&chan, &auth, rx, &mark)
                .await
                .map_err(|e| format!("{e:#}"));
            (tally, Some(figures))
        }
    };

    // Each arm: setup, then (idle memory, timed load, check).
    let (scenario, what, idle, tally, half, setup, check, events) = match name {
        "spread" => {
            let ids = wallet_ids("spread", settings.wallets);
            open_wallets(&wallet_chans[0], &auth, &ids).await?;
            let setup = setup_started.elapsed();
            let idle = sample(stack, backend).await;
            let n = tasks(128);
            let op = charge_op("spread", wallet_chans.clone(), auth.clone(), ids.clone());
            let (tally, events) = full(n, op.clone()).await;
            let half = half_rate(settings, &tally, 1, op).await;
            let counts = tally.counts_with(half.as_ref().map(|h| &h.1));
            let check = check_wallets(&wallet_chans[0], &auth, &ids, &counts).await;
            let what = format!(
                "ChargeMailing over {} wallets, {n} callers",
                settings.wallets
            );
            ("spread", what, idle, tally, half, setup, check, events)
        }
        "hot" => {
            let ids = Arc::new(vec!["hot".to_string()]);
            open_wallets(&wallet_chans[0], &auth, &ids).await?;
            let setup = setup_started.elapsed();
            let idle = sample(stack, backend).await;
            let n = tasks(256);
            let op = charge_op("hot", wallet_chans.clone(), auth.clone(), ids.clone());
            let (tally, events) = full(n, op.clone()).await;
            let half = half_rate(settings, &tally, 1, op).await;
            let counts = tally.counts_with(half.as_ref().map(|h| &h.1));
            let check = check_wallets(&wallet_chans[0], &auth, &ids, &counts).await;
            let what = format!("ChargeMailing on one wallet, {n} callers");
            ("hot", what, idle, tally, half, setup, check, events)
        }
        "reseller-hot" => {
            let reseller_chans = channels(&stack.reseller.url(), CHANNELS).await?;
            let partner = "agency";
            setup_partner(
                &reseller_chans[0],
                &wallet_chans[0],
                &auth,
                partner,
                settings.customers,
            )
            .await?;
            let setup = setup_started.elapsed();
            let idle = sample(stack, backend).await;
            let n = tasks(256);
            let op = reseller_op(reseller_chans, auth.clone(), partner, settings.customers);
            let (tally, events) = full(n, op.clone()).await;
            let half = half_rate(settings, &tally, 1, op).await;
            let counts = tally.counts_with(half.as_ref().map(|h| &h.1));
            let ids = Arc::new(vec![format!("partner:{partner}")]);
            let check = check_wallets(&wallet_chans[0], &auth, &ids, &counts).await;
            let what = format!(
                "reseller ChargeMailing, {} partner-pays customers of one partner, {n} callers",
                settings.customers
            );
            (
                "reseller-hot",
                what,
                idle,
                tally,
                half,
                setup,
                check,
                events,
            )
        }
        "reserve-capture" => {
            let ids = wallet_ids("rc", settings.wallets);
            open_wallets(&wallet_chans[0], &auth, &ids).await?;
            let setup = setup_started.elapsed();
            let idle = sample(stack, backend).await;
            let n = tasks(128);
            let op = reserve_capture_op(wallet_chans.clone(), auth.clone(), ids.clone());
            let (tally, events) = full(n, op.clone()).await;
            let half = half_rate(settings, &tally, 2, op).await;
            let counts = tally.counts_with(half.as_ref().map(|h| &h.1));
            let check = check_wallets(&wallet_chans[0], &auth, &ids, &counts).await;
            let what = format!(
                "ReserveCredits + CaptureReservation over {} wallets, {n} callers (each call counted)",
                settings.wallets
            );
            (
                "reserve-capture",
                what,
                idle,
                tally,
                half,
                setup,
                check,
                events,
            )
        }
        "opens" => {
            let setup = setup_started.elapsed();
            let before = events::head(&wallet_chans[0], &auth).await?;
            let idle = sample(stack, backend).await;
            let n = tasks(128);
            let op = open_op(wallet_chans.clone(), auth.clone());
            let (tally, events) = full(n, op.clone()).await;
            let half = half_rate(settings, &tally, 1, op).await;
            let counts = tally.counts_with(half.as_ref().map(|h| &h.1));
            let check = check_opens(&wallet_chans[0], &auth, before, &counts).await;
            let what =
                format!("OpenWallet of new wallets (one wallet.opened event each), {n} callers");
            ("opens", what, idle, tally, half, setup, check, events)
        }
        "renewals" => {
            let sub_chans = channels(&stack.subscription.url(), 1).await?;
            let ch = &sub_chans[0];
            let (period_end, cursor) =
                subscribe_all(ch, &wallet_chans[0], &auth, settings.renewals).await?;
            let setup = setup_started.elapsed();
            let idle = sample(stack, backend).await;
            // Room for a slow run (100 renewals/s) without waiting forever on a stuck one.
            let limit = Duration::from_secs((settings.renewals as u64 / 100).max(120));
            let tally = renew_all(ch, &auth, settings.renewals, period_end, cursor, limit).await?;
            let check =
                check_renewals(ch, &wallet_chans[0], &auth, settings.renewals, &tally).await;
            let what = format!(
                "renewal run of {} card subscriptions ({MONTHLY_CREDITS} credits a month) after one AdvanceTime (latency: clock move to the last of the renewal's invoice, its payment and its credits)",
                settings.renewals
            );
            ("renewals", what, idle, tally, None, setup, check, None)
        }
        other => bail!("unknown scenario {other:?}; one of {}", ALL.join(", ")),
    };
    let end = sample(stack, backend).await;
    let postgres = match (idle.postgres, end.postgres) {
        (Some(before), Some(after)) => Some(after.since(&before)),
        _ => None,
    };
    let memory = idle
        .memory
        .into_iter()
        .zip(end.memory)
        .map(|((name, idle), (_, end))| (name, idle, end))
        .collect();
    Ok(Outcome {
        scenario,
        backend,
        what,
        tally,
        half,
        setup,
        memory,
        postgres,
        check,
        events,
    })
}

/// Offers the load of `full` again, open loop, at half its throughput (in steps of
/// `calls_per_step` calls) for the same seconds: the latency at half the maximum rate.
async fn half_rate(
    settings: &Settings,
    full: &Tally,
    calls_per_step: u64,
    op: Operation,
) -> Option<(u64, Tally)> {
    if !settings.half_rate {
        return None;
    }
    let rate = settings
        .rate
        .unwrap_or((full.throughput() / calls_per_step / 2).max(1));
    let secs = Duration::from_secs(settings.seconds);
    Some((rate, load::pace(rate, secs, 1_000_000, 8192, op).await))
}

fn memory(stack: &Stack) -> Vec<(&'static str, Memory)> {
    stack
        .services()
        .iter()
        .map(|s| (s.name, s.memory()))
        .collect()
}

fn wallet_ids(prefix: &str, n: usize) -> Arc<Vec<String>> {
    Arc::new((0..n).map(|i| format!("{prefix}-{i}")).collect())
}

fn pricing() -> w::CreditPricing {
    w::CreditPricing {
        mode: w::TierMode::Graduated as i32,
        tiers: vec![
            w::PriceTier {
                first: 1,
                last: 10_000,
                unit_price: "0.010".into(),
                ..Default::default()
            },
            w::PriceTier {
                first: 10_001,
                last: 0,
                unit_price: "0.008".into(),
                ..Default::default()
            },
        ],
    }
}

fn one_credit_per_recipient() -> w::RatingRule {
    w::RatingRule {
        credits_per_recipient: "1".into(),
        per_mailing_surcharge: 0,
    }
}

/// Opens every wallet with [`START_CREDITS`] signup credits (a grant, C8), in parallel.
async fn open_wallets(ch: &Channel, auth: &Auth, ids: &[String]) -> anyhow::Result<()> {
    load::parallel(ids.iter(), SETUP_CONCURRENCY, |id| {
        let mut client = CreditsWalletClient::new(ch.clone());
        let req = auth.req(w::OpenWalletRequest {
            idempotency_key: format!("open-{id}"),
            wallet_id: id.clone(),
            currency: "EUR".into(),
            pricing: Some(pricing()),
            rating: Some(one_credit_per_recipient()),
            signup_credits: START_CREDITS,
            ..Default::default()
        });
        async move {
            client
                .open_wallet(req)
                .await
                .with_context(|| format!("opening wallet {id}"))?;
            Ok(())
        }
    })
    .await
}

/// Opens a new wallet per step (no signup credits): one `wallet.opened` event each.
fn open_op(chans: Vec<Channel>, auth: Auth) -> Operation {
    Arc::new(move |task, seq| {
        let mut client = CreditsWalletClient::new(chans[task % chans.len()].clone());
        let req = auth.req(w::OpenWalletRequest {
            idempotency_key: format!("opens-{task}-{seq}"),
            wallet_id: format!("opens-{task}-{seq}"),
            currency: "EUR".into(),
            pricing: Some(pricing()),
            rating: Some(one_credit_per_recipient()),
            ..Default::default()
        });
        Box::pin(async move {
            let (call, _) = timed("OpenWallet", client.open_wallet(req)).await;
            vec![call]
        })
    })
}

/// The wallet's outbox grew by one event per wallet opened: between the successful calls and
/// those plus the calls of unknown outcome.
async fn check_opens(
    ch: &Channel,
    auth: &Auth,
    before: u64,
    counts: &BTreeMap<&'static str, (u64, u64)>,
) -> Result<String, String> {
    let (ok, unsure) = counts.get("OpenWallet").copied().unwrap_or_default();
    // Committed events get their cursor within the outbox relay's poll (200 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = events::head(ch, auth).await.map_err(|e| format!("{e:#}"))?;
    let written = after.saturating_sub(before);
    if written < ok || written > ok + unsure {
        return Err(format!(
            "{written} events written for {ok} wallets opened ({unsure} calls of unknown outcome)"
        ));
    }
    Ok(format!(
        "{written} wallet.opened events in the outbox for {ok} successful OpenWallet calls"
    ))
}

fn charge_op(
    scenario: &'static str,
    chans: Vec<Channel>,
    auth: Auth,
    ids: Arc<Vec<String>>,
) -> Operation {
    Arc::new(move |task, seq| {
        let mut client = CreditsWalletClient::new(chans[task % chans.len()].clone());
        let wallet_id = ids[pick(task, seq, ids.len() as u64) as usize].clone();
        let req = auth.req(w::ChargeMailingRequest {
            idempotency_key: format!("{scenario}-{task}-{seq}"),
            wallet_id,
            mailing_id: format!("m-{task}-{seq}"),
            recipients: RECIPIENTS,
        });
        Box::pin(async move {
            let (call, _) = timed("ChargeMailing", client.charge_mailing(req)).await;
            vec![call]
        })
    })
}

fn reserve_capture_op(chans: Vec<Channel>, auth: Auth, ids: Arc<Vec<String>>) -> Operation {
    Arc::new(move |task, seq| {
        let mut client = CreditsWalletClient::new(chans[task % chans.len()].clone());
        let wallet_id = ids[pick(task, seq, ids.len() as u64) as usize].clone();
        let auth = auth.clone();
        Box::pin(async move {
            let reserve = auth.req(w::ReserveCreditsRequest {
                idempotency_key: format!("rc-r-{task}-{seq}"),
                wallet_id: wallet_id.clone(),
                mailing_id: format!("m-{task}-{seq}"),
                recipients: RECIPIENTS,
                ttl_seconds: 0,
            });
            let (first, held) = timed("ReserveCredits", client.reserve_credits(reserve)).await;
            let Some(held) = held else {
                return vec![first];
            };
            let capture = auth.req(w::CaptureReservationRequest {
                idempotency_key: format!("rc-c-{task}-{seq}"),
                wallet_id,
                reservation_id: held.into_inner().reservation_id,
                recipients_sent: RECIPIENTS,
            });
            let (second, _) =
                timed("CaptureReservation", client.capture_reservation(capture)).await;
            vec![first, second]
        })
    })
}

async fn setup_partner(
    reseller: &Channel,
    wallet: &Channel,
    auth: &Auth,
    partner: &str,
    customers: usize,
) -> anyhow::Result<()> {
    let mut client = ResellerBillingClient::new(reseller.clone());
    client
        .register_partner(auth.req(rs::RegisterPartnerRequest {
            idempotency_key: format!("reg-{partner}"),
            partner_id: partner.into(),
            currency: "EUR".into(),
            funding: rs::PartnerFunding::Prepaid as i32,
            payment_method: "pm_card_ok".into(),
            pricing: Some(pricing()),
            rating: Some(one_credit_per_recipient()),
        }))
        .await
        .context("registering the partner")?;
    let bought = CreditsWalletClient::new(wallet.clone())
        .purchase_credits(auth.req(w::PurchaseCreditsRequest {
            idempotency_key: format!("buy-{partner}"),
            wallet_id: format!("partner:{partner}"),
            credits: START_CREDITS,
            payment_method: "pm_card_ok".into(),
            ..Default::default()
        }))
        .await
        .context("buying the partner's credits")?
        .into_inner();
    if bought.status != w::PurchaseStatus::Succeeded as i32 {
        bail!("the partner's purchase did not succeed: {bought:?}");
    }
    load::parallel(0..customers, SETUP_CONCURRENCY, |i| {
        let mut client = client.clone();
        let req = auth.req(rs::AddCustomerRequest {
            idempotency_key: format!("add-c-{i}"),
            partner_id: partner.into(),
            customer_id: format!("c-{i}"),
            billing_mode: rs::BillingMode::PartnerPays as i32,
        });
        async move {
            client
                .add_customer(req)
                .await
                .with_context(|| format!("adding customer c-{i}"))?;
            Ok(())
        }
    })
    .await
}

fn reseller_op(
    chans: Vec<Channel>,
    auth: Auth,
    partner: &'static str,
    customers: usize,
) -> Operation {
    Arc::new(move |task, seq| {
        let mut client = ResellerBillingClient::new(chans[task % chans.len()].clone());
        let customer = pick(task, seq, customers as u64);
        let req = auth.req(rs::ChargeMailingRequest {
            idempotency_key: format!("rh-{task}-{seq}"),
            partner_id: partner.into(),
            customer_id: format!("c-{customer}"),
            mailing_id: format!("m-{task}-{seq}"),
            recipients: RECIPIENTS,
        });
        Box::pin(async move {
            let (call, _) = timed("ChargeMailing", client.charge_mailing(req)).await;
            vec![call]
        })
    })
}

/// Every wallet's balance equals the sum of its ledger, each entry's `balance_after` is the
/// running sum, sequences are 1..n without gaps, no credits stay held, and the debits in the
/// ledgers match the successful calls the clients saw.
async fn check_wallets(
    ch: &Channel,
    auth: &Auth,
    ids: &[String],
    counts: &BTreeMap<&'static str, (u64, u64)>,
) -> Result<String, String> {
    let problems = std::sync::Mutex::new(Vec::<String>::new());
    let mailings = std::sync::atomic::AtomicU64::new(0);
    let captures = std::sync::atomic::AtomicU64::new(0);
    let entries = std::sync::atomic::AtomicU64::new(0);
    let held = std::sync::atomic::AtomicU64::new(0);
    let checked = load::parallel(ids.iter(), SETUP_CONCURRENCY, |id| {
        let mut client = CreditsWalletClient::new(ch.clone());
        let (problems, mailings, captures, entries, held) =
            (&problems, &mailings, &captures, &entries, &held);
        async move {
            use std::sync::atomic::Ordering::Relaxed;
            let wallet = client
                .get_wallet(auth.req(w::GetWalletRequest {
                    wallet_id: id.clone(),
                }))
                .await
                .with_context(|| format!("GetWallet {id}"))?
                .into_inner();
            held.fetch_add(wallet.held, Relaxed);
            let mut sum: i64 = 0;
            let mut expected_seq = 1;
            let mut token = String::new();
            loop {
                let page = client
                    .list_ledger_entries(auth.req(w::ListLedgerEntriesRequest {
                        wallet_id: id.clone(),
                        page_size: 500,
                        page_token: token.clone(),
                    }))
                    .await
                    .with_context(|| format!("ListLedgerEntries {id}"))?
                    .into_inner();
                for e in &page.entries {
                    sum += e.delta;
                    if (e.sequence != expected_seq || e.balance_after != sum)
                        && let Ok(mut p) = problems.lock()
                    {
                            p.push(format!(
                                "{id}: entry {} (expected {expected_seq}) balance_after {} but running sum {sum}",
                                e.sequence, e.balance_after
                            ));
                    }
                    expected_seq = e.sequence + 1;
                    if e.kind == w::LedgerEntryKind::Mailing as i32 {
                        mailings.fetch_add(1, Relaxed);
                    } else if e.kind == w::LedgerEntryKind::ReservationCapture as i32 {
                        captures.fetch_add(1, Relaxed);
                    }
                }
                entries.fetch_add(page.entries.len() as u64, Relaxed);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if sum != wallet.balance
                && let Ok(mut p) = problems.lock()
            {
                    p.push(format!(
                        "{id}: balance {} but ledger sums to {sum}",
                        wallet.balance
                    ));
            }
            Ok(())
        }
    })
    .await;
    if let Err(e) = checked {
        return Err(format!("check could not run: {e:#}"));
    }
    let mut problems = problems.into_inner().unwrap_or_default();
    let mailings = mailings.into_inner();
    let captures = captures.into_inner();
    let held = held.into_inner();
    let (rpc, debits) = if counts.contains_key("CaptureReservation") {
        ("CaptureReservation", captures)
    } else {
        ("ChargeMailing", mailings)
    };
    let (ok, uncertain) = counts.get(rpc).copied().unwrap_or_default();
    if debits < ok || debits > ok + uncertain {
        problems.push(format!(
            "{debits} debits in the ledgers but {ok} successful {rpc} calls ({uncertain} uncertain)"
        ));
    }
    // A reserve whose capture failed or a hold of an uncertain capture may stay held; a
    // successful capture leaves nothing held.
    let (reserved, _) = counts.get("ReserveCredits").copied().unwrap_or_default();
    let open_holds = reserved.saturating_sub(captures);
    if held != open_holds * RECIPIENTS {
        problems.push(format!(
            "{held} credits held, expected {} ({open_holds} holds not captured)",
            open_holds * RECIPIENTS
        ));
    }
    if problems.is_empty() {
        Ok(format!(
            "ok: {} wallets, {} ledger entries, balance = sum of ledger; {debits} debits = {ok} successful {rpc}",
            ids.len(),
            entries.into_inner()
        ))
    } else {
        let n = problems.len();
        problems.truncate(5);
        Err(format!("{n} problems: {}", problems.join("; ")))
    }
}

fn plan() -> sub::PlanSpec {
    sub::PlanSpec {
        plan_id: "email".into(),
        name: "Email marketing".into(),
        product: sub::Product::Marketing as i32,
        level: Some(sub::Level {
            name: "starter".into(),
            rank: 1,
        }),
        interval: sub::Interval::Month as i32,
        currency: "EUR".into(),
        contact_tiers: Some(sub::ContactTiers {
            mode: sub::TierMode::Graduated as i32,
            tiers: vec![
                sub::PriceTier {
                    first: 1,
                    last: 10_000,
                    unit_price: "0.006".into(),
                    ..Default::default()
                },
                sub::PriceTier {
                    first: 10_001,
                    last: 0,
                    unit_price: "0.005".into(),
                    ..Default::default()
                },
            ],
        }),
        slider: Some(sub::Slider {
            min: 1000,
            max: 50_000,
            step: 1000,
        }),
        included_seats: 1,
        seat_price: "5".into(),
        proration: sub::ProrationPolicy::ProrateToCycleEnd as i32,
        monthly_credits: MONTHLY_CREDITS,
        ..Default::default()
    }
}

/// The plan's credits granted in each subscriber's wallet every month (C7).
const MONTHLY_CREDITS: u64 = 1_000;
/// Concurrent Subscribe calls of the renewals setup.
const SUBSCRIBE_CONCURRENCY: usize = 128;

/// Publishes the plan, opens the `n` accounts' wallets and subscribes them by card (both in
/// parallel), then waits until the first month's credits are in every wallet; returns the
/// period end they share (the test clock stands still during the setup) and the event cursor
/// the setup's events end near.
async fn subscribe_all(
    ch: &Channel,
    wallet_ch: &Channel,
    auth: &Auth,
    n: usize,
) -> anyhow::Result<(prost_types::Timestamp, u64)> {
    // The wallet runs on the system clock and refuses credits that expire in its past: the
    // subscription's test clock (which starts at a fixed instant) moves to now first, so each
    // month's grant expires after the wallet's now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock before 1970")?;
    TestClockClient::new(ch.clone())
        .advance_time(auth.req(AdvanceTimeRequest {
            to: Some(prost_types::Timestamp {
                seconds: i64::try_from(now.as_secs()).context("system clock")?,
                nanos: 0,
            }),
        }))
        .await
        .context("moving the subscription clock to now")?;
    let ids: Vec<String> = (0..n).map(|i| format!("acct-{i}")).collect();
    let (subscribed, opened) = tokio::join!(
        subscribe_accounts(ch, auth, n),
        open_wallets(wallet_ch, auth, &ids)
    );
    opened.context("opening the subscribers' wallets")?;
    let period_end = subscribed?;
    // Each subscription's first month is granted by the jobs after Subscribe; the timed run
    // must not include that work.
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs((n as u64 / 50).max(120));
    let cursor = watch(ch, auth, 0, "subscription.credits_granted", |event| {
        if event["cycle"] == 1 {
            seen.insert(
                event["subscription_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        seen.len() < n && tokio::time::Instant::now() < deadline
    })
    .await?;
    if seen.len() < n {
        bail!(
            "the first month's credits reached {} of {n} wallets in time",
            seen.len()
        );
    }
    Ok((period_end, cursor))
}

/// Streams the service's events of `types` after `cursor`, calling `f` with each payload (and
/// with `null` each second the stream is quiet) until it returns `false`, resuming after a
/// broken stream; returns the last cursor seen.
async fn watch(
    ch: &Channel,
    auth: &Auth,
    mut cursor: u64,
    types: &str,
    mut f: impl FnMut(&serde_json::Value) -> bool,
) -> anyhow::Result<u64> {
    loop {
        let req = auth.stream_req(WatchEventsRequest {
            after_cursor: cursor,
            types: types.split(',').map(str::to_string).collect(),
        });
        let mut stream = SubscriptionsClient::new(ch.clone())
            .watch_events(req)
            .await
            .context("watching events")?
            .into_inner();
        loop {
            // A quiet stream still gives `f` its say on the deadline.
            let next = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
            match next {
                Ok(Some(Ok(event))) => {
                    cursor = event.cursor;
                    let payload: serde_json::Value =
                        serde_json::from_str(&event.payload_json).unwrap_or_default();
                    if !f(&payload) {
                        return Ok(cursor);
                    }
                }
                Ok(Some(Err(_)) | None) => break,
                Err(_) => {
                    if !f(&serde_json::Value::Null) {
                        return Ok(cursor);
                    }
                }
            }
        }
    }
}

async fn subscribe_accounts(
    ch: &Channel,
    auth: &Auth,
    n: usize,
) -> anyhow::Result<prost_types::Timestamp> {
    CatalogClient::new(ch.clone())
        .publish_plan(auth.req(sub::PublishPlanRequest {
            idempotency_key: "plan-email".into(),
            plan: Some(plan()),
        }))
        .await
        .context("publishing the plan")?;
    let period_end = std::sync::Mutex::new(None);
    load::parallel(0..n, SUBSCRIBE_CONCURRENCY, |i| {
        let mut client = SubscriptionsClient::new(ch.clone());
        let period_end = &period_end;
        let req = auth.req(sub::SubscribeRequest {
            idempotency_key: format!("sub-{i}"),
            account_id: format!("acct-{i}"),
            plan_id: "email".into(),
            contacts: 5000,
            seats: 1,
            payment: Some(sub::Payment {
                kind: sub::PaymentKind::Card as i32,
                payment_method: "pm_card_ok".into(),
            }),
            vat_rate: "0.21".into(),
            ..Default::default()
        });
        async move {
            let s = client
                .subscribe(req)
                .await
                .with_context(|| format!("subscribing acct-{i}"))?
                .into_inner();
            if let Ok(mut end) = period_end.lock()
                && end.is_none()
            {
                *end = s.current_period_end;
            }
            Ok(())
        }
    })
    .await?;
    period_end
        .into_inner()
        .ok()
        .flatten()
        .context("no subscription answered a period end")
}

/// Moves the clock past the period end and times each renewal from then to the last of its
/// three events: the renewal invoice issued, that invoice paid, the new month's credits granted.
async fn renew_all(
    ch: &Channel,
    auth: &Auth,
    n: usize,
    period_end: prost_types::Timestamp,
    after_cursor: u64,
    limit: Duration,
) -> anyhow::Result<Tally> {
    // Per subscription, which of the three arrived (bits 1, 2, 4).
    let mut parts: std::collections::HashMap<String, u8> = std::collections::HashMap::new();
    let mut renewal_invoices: std::collections::HashMap<String, String> =
        std::collections::HashMap::new();
    let mut tally = Tally {
        tasks: 1,
        ..Tally::default()
    };
    let start = Instant::now();
    TestClockClient::new(ch.clone())
        .advance_time(auth.req(AdvanceTimeRequest {
            to: Some(prost_types::Timestamp {
                seconds: period_end.seconds + 1,
                nanos: 0,
            }),
        }))
        .await
        .context("advancing the subscription clock")?;
    let deadline = Instant::now() + limit;
    let mut done = 0usize;
    watch(
        ch,
        auth,
        after_cursor,
        "subscription.invoice_issued,subscription.invoice_paid,subscription.credits_granted",
        |e| {
            let subscription = e["subscription_id"].as_str().unwrap_or_default();
            let part = if e["kind"] == "renewal" {
                renewal_invoices.insert(
                    e["invoice_id"].as_str().unwrap_or_default().to_string(),
                    subscription.to_string(),
                );
                1
            } else if e["number"].is_u64()
                && e["kind"].is_null()
                && renewal_invoices.contains_key(e["invoice_id"].as_str().unwrap_or_default())
            {
                2
            } else if e["cycle"] == 2 {
                4
            } else {
                0
            };
            if part != 0 {
                let had = parts.entry(subscription.to_string()).or_default();
                if *had != 7 && *had | part == 7 {
                    done += 1;
                    tally
                        .micros
                        .push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                *had |= part;
            }
            done < n && Instant::now() < deadline
        },
    )
    .await?;
    tally.ok = done as u64;
    tally.elapsed = start.elapsed();
    let missing = n.saturating_sub(done) as u64;
    if missing > 0 {
        let (mut invoiced, mut paid, mut credited) = (0, 0, 0);
        for p in parts.values() {
            invoiced += u64::from(p & 1 != 0);
            paid += u64::from(p & 2 != 0);
            credited += u64::from(p & 4 != 0);
        }
        tally.errors.insert(
            format!(
                "not renewed within {} s (invoiced {invoiced}, paid {paid}, credited {credited})",
                limit.as_secs()
            ),
            missing,
        );
    }
    tally.micros.sort_unstable();
    Ok(tally)
}

/// Every sampled account has exactly one renewal invoice, and the events counted one per
/// subscription.
async fn check_renewals(
    ch: &Channel,
    wallet_ch: &Channel,
    auth: &Auth,
    n: usize,
    tally: &Tally,
) -> Result<String, String> {
    let sample: Vec<usize> = (0..n).step_by((n / 200).max(1)).collect();
    let problems = std::sync::Mutex::new(Vec::<String>::new());
    let paid = std::sync::atomic::AtomicU64::new(0);
    let run = load::parallel(sample.iter().copied(), 16, |i| {
        let mut client = SubscriptionsClient::new(ch.clone());
        let (problems, paid) = (&problems, &paid);
        async move {
            let invoices = client
                .list_invoices(auth.req(sub::ListInvoicesRequest {
                    account_id: format!("acct-{i}"),
                    ..Default::default()
                }))
                .await
                .with_context(|| format!("ListInvoices acct-{i}"))?
                .into_inner()
                .invoices;
            let renewals: Vec<_> = invoices
                .iter()
                .filter(|inv| inv.kind == "renewal")
                .collect();
            if renewals.len() != 1
                && let Ok(mut p) = problems.lock()
            {
                p.push(format!("acct-{i}: {} renewal invoices", renewals.len()));
            }
            if renewals
                .iter()
                .any(|inv| inv.status == sub::InvoiceStatus::Paid as i32)
            {
                paid.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // Signup credits plus two months of the plan's, each granted once.
            let balance = CreditsWalletClient::new(wallet_ch.clone())
                .get_wallet(auth.req(w::GetWalletRequest {
                    wallet_id: format!("acct-{i}"),
                }))
                .await
                .with_context(|| format!("GetWallet acct-{i}"))?
                .into_inner()
                .balance;
            let expected = START_CREDITS + 2 * MONTHLY_CREDITS;
            if u64::try_from(balance).ok() != Some(expected)
                && let Ok(mut p) = problems.lock()
            {
                p.push(format!("acct-{i}: balance {balance}, expected {expected}"));
            }
            Ok(())
        }
    })
    .await;
    if let Err(e) = run {
        return Err(format!("check could not run: {e:#}"));
    }
    let mut problems = problems.into_inner().unwrap_or_default();
    if tally.ok != n as u64 {
        problems.push(format!("{} of {n} renewal invoices seen", tally.ok));
    }
    if problems.is_empty() {
        Ok(format!(
            "ok: {n} renewals invoiced, paid and credited; sample of {}: one renewal invoice each, {} paid, two months of credits in each wallet",
            sample.len(),
            paid.into_inner()
        ))
    } else {
        let k = problems.len();
        problems.truncate(5);
        Err(format!("{k} problems: {}", problems.join("; ")))
    }
}
