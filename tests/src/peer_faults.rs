//! The credits-wallet down or slow while reseller-billing and subscription call it. A TCP proxy
//! in the test stands between each caller and the real wallet and passes bytes, holds every
//! reply of the wallet for longer than the callers' peer timeout (5 s) while passing requests
//! at once (so the wallet does the work and its answer comes too late: the worst case, a
//! mutation the caller cannot know about), or is down (cuts open connections and refuses new
//! ones). The callers must answer quickly with a retryable code, nothing may be debited or
//! granted twice, and once the wallet is back a retry with the same key completes exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use proto::{
    common::v1::WatchEventsRequest,
    reseller::v1::{self as rpb, reseller_billing_client::ResellerBillingClient},
    subscription::v1::{
        self as spb, catalog_client::CatalogClient, subscriptions_client::SubscriptionsClient,
    },
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::{
    Running,
    testing::{self, ADMIN_TOKEN, authed},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tonic::{Code, transport::Channel};

use crate::channel;

/// How long the proxy holds each reply in [`Mode::SlowReplies`]: longer than the 5 s timeout
/// of the callers' wallet peer.
const REPLY_DELAY: Duration = Duration::from_secs(6);
/// A generous liveness bound for a call that must fail fast (peer timeout 5 s + margin).
const FAIL_FAST_BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    SlowReplies,
    Down,
}

/// A TCP proxy to `target` whose behaviour [`Proxy::set`] switches; every switch cuts the
/// connections open at the time, so the callers reconnect through the new behaviour.
struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<(Mode, u64)>,
    /// Connections refused while down.
    refused: Arc<AtomicU64>,
    /// Reply chunks written after being held for [`REPLY_DELAY`].
    late_replies: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel((Mode::Pass, 0));
        let refused = Arc::new(AtomicU64::new(0));
        let late_replies = Arc::new(AtomicU64::new(0));
        let (modes, refusals, late) = (mode.clone(), refused.clone(), late_replies.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let watcher = modes.subscribe();
                if watcher.borrow().0 == Mode::Down {
                    refusals.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, target, watcher, late.clone()));
            }
        });
        Proxy {
            addr,
            mode,
            refused,
            late_replies,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, mode: Mode) {
        self.mode.send_modify(|(m, epoch)| {
            *m = mode;
            *epoch += 1;
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection: requests pass at once; replies are held in [`Mode::SlowReplies`]; the
/// connection is cut when the mode is switched.
async fn relay(
    client: TcpStream,
    target: SocketAddr,
    mut watcher: watch::Receiver<(Mode, u64)>,
    late: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let epoch = watcher.borrow_and_update().1;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (replies, mut held) = tokio::sync::mpsc::unbounded_channel::<(Instant, Mode, Vec<u8>)>();
    let modes = watcher.clone();
    let upstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream_read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = server_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let mode = modes.borrow().0;
            if replies
                .send((Instant::now() + REPLY_DELAY, mode, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    let downstream_write = async move {
        while let Some((due, mode, bytes)) = held.recv().await {
            if mode == Mode::SlowReplies {
                tokio::time::sleep_until(due.into()).await;
                late.fetch_add(1, Ordering::SeqCst);
            }
            if client_write.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    let switched = async move {
        while watcher.changed().await.is_ok() {
            if watcher.borrow().1 != epoch {
                return;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = async { tokio::join!(downstream_read, downstream_write) } => {}
        _ = switched => {}
    }
}

/// The wallet, and a caller (`start_caller`) whose wallet peer is a proxy to it.
struct Setup {
    db: testing::TestDatabase,
    wallet: Running,
    wallets: CreditsWalletClient<Channel>,
    proxy: Proxy,
}

impl Setup {
    async fn start() -> Setup {
        let db = testing::TestDatabase::fresh();
        let wallet = runtime::server::start(
            &credits_wallet::SPEC,
            testing::config(&credits_wallet::DEFAULTS, &db.sibling("wallet")),
            credits_wallet::routes,
        )
        .await
        .unwrap();
        let wallets = CreditsWalletClient::new(channel(&wallet).await.unwrap());
        let proxy = Proxy::start(wallet.addr).await;
        Setup {
            db,
            wallet,
            wallets,
            proxy,
        }
    }

    fn peer_toml(&self) -> String {
        format!(
            "[peers.wallet]\nurl = \"{}\"\ntoken = \"{ADMIN_TOKEN}\"\n",
            self.proxy.url()
        )
    }

    async fn balance(&self, wallet_id: &str) -> i64 {
        self.wallets
            .clone()
            .get_wallet(authed(
                ADMIN_TOKEN,
                wpb::GetWalletRequest {
                    wallet_id: wallet_id.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .balance
    }

    async fn entries(&self, wallet_id: &str) -> Vec<wpb::LedgerEntry> {
        self.wallets
            .clone()
            .list_ledger_entries(authed(
                ADMIN_TOKEN,
                wpb::ListLedgerEntriesRequest {
                    wallet_id: wallet_id.into(),
                    page_size: 500,
                    page_token: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .entries
    }

    /// Waits (at most 15 s) until `wallet_id` holds `balance`.
    async fn wait_balance(&self, wallet_id: &str, balance: i64) {
        let until = Instant::now() + Duration::from_secs(15);
        while self.balance(wallet_id).await != balance {
            assert!(
                Instant::now() < until,
                "{wallet_id} never reached {balance}: {}",
                self.balance(wallet_id).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn verify_clean(&self) -> wpb::VerifyLedgerResponse {
        let report = self
            .wallets
            .clone()
            .verify_ledger(authed(
                ADMIN_TOKEN,
                wpb::VerifyLedgerRequest {
                    outbox_grace_seconds: 0,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(report.violations_total, 0, "{:?}", report.violations);
        report
    }
}

/// Retries `call` while it answers `UNAVAILABLE` (a reconnect after the wallet came back), at
/// most 15 s.
async fn retried<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        match call().await {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

fn retryable(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
}

#[tokio::test]
async fn reseller_charges_with_the_wallet_down_or_slow_fail_fast_and_retries_debit_once() {
    let started = Instant::now();
    let s = Setup::start().await;
    let reseller_db = s.db.sibling("reseller");
    let reseller = runtime::server::start(
        &reseller_billing::SPEC,
        testing::config_with(&reseller_billing::DEFAULTS, &reseller_db, &s.peer_toml()),
        reseller_billing::routes,
    )
    .await
    .unwrap();
    let mut client = ResellerBillingClient::new(channel(&reseller).await.unwrap());
    client
        .register_partner(authed(
            ADMIN_TOKEN,
            rpb::RegisterPartnerRequest {
                idempotency_key: "reg".into(),
                partner_id: "p1".into(),
                currency: "EUR".into(),
                funding: rpb::PartnerFunding::Prepaid as i32,
                payment_method: String::new(),
                pricing: Some(wpb::CreditPricing {
                    mode: wpb::TierMode::Graduated as i32,
                    tiers: vec![wpb::PriceTier {
                        first: 1,
                        last: 0,
                        unit_price: "0.01".into(),
                        flat_price: String::new(),
                    }],
                }),
                rating: Some(wpb::RatingRule {
                    credits_per_recipient: "1".into(),
                    per_mailing_surcharge: 0,
                }),
            },
        ))
        .await
        .unwrap();
    client
        .add_customer(authed(
            ADMIN_TOKEN,
            rpb::AddCustomerRequest {
                idempotency_key: "add".into(),
                partner_id: "p1".into(),
                customer_id: "c1".into(),
                billing_mode: rpb::BillingMode::PartnerPays as i32,
            },
        ))
        .await
        .unwrap();
    s.wallets
        .clone()
        .grant_credits(authed(
            ADMIN_TOKEN,
            wpb::GrantCreditsRequest {
                idempotency_key: "fund".into(),
                wallet_id: "partner:p1".into(),
                credits: 10_000,
                kind: wpb::LotKind::Promotional as i32,
                expires_at: None,
                reference: "funding".into(),
            },
        ))
        .await
        .unwrap();
    let send = |key: &str, mailing: &str| rpb::ChargeMailingRequest {
        idempotency_key: key.into(),
        partner_id: "p1".into(),
        customer_id: "c1".into(),
        mailing_id: mailing.into(),
        recipients: 1_000,
    };
    let charge = |req: rpb::ChargeMailingRequest| {
        let mut c = client.clone();
        async move {
            c.charge_mailing(authed(ADMIN_TOKEN, req))
                .await
                .map(|r| r.into_inner())
        }
    };

    // Down: the call fails fast and nothing is debited.
    s.proxy.set(Mode::Down);
    let t = Instant::now();
    let down = charge(send("send-down", "m-down")).await.unwrap_err();
    let down_took = t.elapsed();
    assert!(retryable(&down), "wallet down: {down:?}");
    assert!(down_took < FAIL_FAST_BOUND, "wallet down: {down_took:?}");
    assert!(
        s.proxy.refused.load(Ordering::SeqCst) > 0,
        "the call met the down wallet"
    );
    assert_eq!(s.balance("partner:p1").await, 10_000, "nothing debited");

    // Slow: a send passes first (so the connection is up), then the wallet's replies are held
    // past the peer timeout. The wallet debits; the reseller's call times out.
    s.proxy.set(Mode::Pass);
    let warm = retried(|| charge(send("send-warm", "m-warm")))
        .await
        .unwrap();
    assert_eq!(warm.credits, 1_000);
    s.proxy.set(Mode::SlowReplies);
    // The switch cut the connection; the first call through the slow proxy may be the one
    // that reconnects.
    let t = Instant::now();
    let slow = charge(send("send-slow", "m-slow")).await.unwrap_err();
    let slow_took = t.elapsed();
    assert!(retryable(&slow), "wallet slow: {slow:?}");
    assert!(slow_took < FAIL_FAST_BOUND, "wallet slow: {slow_took:?}");
    assert!(
        !slow.message().contains("nothing was debited"),
        "a wallet that did not answer may have debited: {slow:?}"
    );
    // The wallet did debit (its answer was the part that was late).
    s.wait_balance("partner:p1", 8_000).await;

    // Back: each retry with its key completes once; the slow one is not debited again.
    s.proxy.set(Mode::Pass);
    let t = Instant::now();
    let slow_done = retried(|| charge(send("send-slow", "m-slow")))
        .await
        .unwrap();
    let down_done = retried(|| charge(send("send-down", "m-down")))
        .await
        .unwrap();
    let retries_took = t.elapsed();
    assert_eq!((slow_done.credits, down_done.credits), (1_000, 1_000));
    assert_eq!(
        s.balance("partner:p1").await,
        7_000,
        "three sends, each once"
    );
    // And again: the same answers, no further debit.
    assert_eq!(
        charge(send("send-slow", "m-slow")).await.unwrap(),
        slow_done
    );
    assert_eq!(
        charge(send("send-down", "m-down")).await.unwrap(),
        down_done
    );
    let entries = s.entries("partner:p1").await;
    for mailing in ["m-warm", "m-slow", "m-down"] {
        let n = entries
            .iter()
            .filter(|e| e.reference == format!("mailing:{mailing}"))
            .count();
        assert_eq!(n, 1, "{mailing} in the ledger once: {entries:?}");
    }
    assert_eq!(entries.len(), 4, "the funding grant and three sends");
    let report = s.verify_clean().await;
    eprintln!(
        "peer faults, reseller [{:?}]: down answered {:?} in {down_took:.2?} ({} connections \
         refused); slow answered {:?} in {slow_took:.2?}; retries completed in {retries_took:.2?}; \
         3 sends debited once each (balance 7000); VerifyLedger {} entries, 0 violations; total \
         {:.1?}",
        testing::backend(),
        down.code(),
        s.proxy.refused.load(Ordering::SeqCst),
        slow.code(),
        report.entries_checked,
        started.elapsed()
    );
    reseller.stop().await.unwrap();
    s.wallet.stop().await.unwrap();
}

/// Reads `subscription.credits_granted` events from the subscription's stream until one per
/// account of `accounts` has arrived (at most 20 s); returns how many arrived per account.
async fn credits_granted(subs: &SubscriptionsClient<Channel>, accounts: &[&str]) -> Vec<usize> {
    let mut stream = subs
        .clone()
        .watch_events(authed(
            ADMIN_TOKEN,
            WatchEventsRequest {
                after_cursor: 0,
                types: vec!["subscription.credits_granted".into()],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut counts = vec![0usize; accounts.len()];
    let until = Instant::now() + Duration::from_secs(20);
    while counts.contains(&0) {
        let left = until.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, stream.message())
            .await
            .unwrap_or_else(|_| panic!("credits_granted events so far: {counts:?}"))
            .unwrap()
            .expect("the stream stays open");
        let payload = format!("{} {}", event.subject, event.payload_json);
        if let Some(i) = accounts.iter().position(|a| payload.contains(a)) {
            counts[i] += 1;
        }
    }
    counts
}

#[tokio::test]
async fn subscription_credit_grants_with_the_wallet_slow_or_down_are_granted_once_when_it_is_back()
{
    let started = Instant::now();
    let s = Setup::start().await;
    let subscription_db = s.db.sibling("subscription");
    let subscription = runtime::server::start(
        &subscription::SPEC,
        testing::config_with(&subscription::DEFAULTS, &subscription_db, &s.peer_toml()),
        subscription::routes,
    )
    .await
    .unwrap();
    let ch = channel(&subscription).await.unwrap();
    let subs = SubscriptionsClient::new(ch.clone());
    CatalogClient::new(ch)
        .publish_plan(authed(
            ADMIN_TOKEN,
            spb::PublishPlanRequest {
                idempotency_key: "plan".into(),
                plan: Some(crate::scenarios::plan("email")),
            },
        ))
        .await
        .unwrap();
    let accounts = ["acct-pass", "acct-slow", "acct-down"];
    for account in accounts {
        s.wallets
            .clone()
            .open_wallet(authed(
                ADMIN_TOKEN,
                wpb::OpenWalletRequest {
                    idempotency_key: format!("open-{account}"),
                    wallet_id: account.into(),
                    currency: "EUR".into(),
                    pricing: Some(wpb::CreditPricing {
                        mode: wpb::TierMode::Volume as i32,
                        tiers: vec![wpb::PriceTier {
                            first: 1,
                            last: 0,
                            unit_price: "0.01".into(),
                            flat_price: String::new(),
                        }],
                    }),
                    rating: Some(wpb::RatingRule {
                        credits_per_recipient: "1".into(),
                        per_mailing_surcharge: 0,
                    }),
                    signup_credits: 0,
                    signup_credits_expire_at: None,
                },
            ))
            .await
            .unwrap();
    }
    let subscribe = |account: &str| {
        let mut subs = subs.clone();
        let req = crate::card_subscribe(
            format!("sub-{account}"),
            Some(spb::Actor {
                user_id: "primary-admin".into(),
                billing_permission: true,
            }),
            account,
            "email",
            5_000,
        );
        async move {
            let t = Instant::now();
            subs.subscribe(authed(ADMIN_TOKEN, req)).await.unwrap();
            t.elapsed()
        }
    };

    // Passing: the month's 1,000 credits arrive (and the connection is up).
    subscribe("acct-pass").await;
    s.wait_balance("acct-pass", 1_000).await;

    // Slow: the wallet grants, but its answer reaches the subscription's jobs after their
    // peer timeout, so they do not record the grant and will try again.
    s.proxy.set(Mode::SlowReplies);
    let slow_subscribe = subscribe("acct-slow").await;
    s.wait_balance("acct-slow", 1_000).await;
    let until = Instant::now() + Duration::from_secs(20);
    while s.proxy.late_replies.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < until, "no reply was held past the timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Down: subscribing still answers at once; the grant fails and waits.
    s.proxy.set(Mode::Down);
    let down_subscribe = subscribe("acct-down").await;
    let until = Instant::now() + Duration::from_secs(20);
    while s.proxy.refused.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < until,
            "the jobs did not try the down wallet"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.balance("acct-down").await,
        0,
        "nothing granted while down"
    );
    assert_eq!(
        s.balance("acct-slow").await,
        1_000,
        "granted once while slow"
    );

    // Back: the jobs retry with the same keys; every account ends with one grant.
    s.proxy.set(Mode::Pass);
    let t = Instant::now();
    let counts = credits_granted(&subs, &accounts).await;
    let recovered = t.elapsed();
    assert_eq!(
        counts,
        vec![1, 1, 1],
        "one credits_granted event per account"
    );
    for account in accounts {
        assert_eq!(s.balance(account).await, 1_000, "{account}");
        let entries = s.entries(account).await;
        assert_eq!(entries.len(), 1, "{account} granted once: {entries:?}");
    }
    assert!(slow_subscribe < FAIL_FAST_BOUND && down_subscribe < FAIL_FAST_BOUND);
    let report = s.verify_clean().await;
    eprintln!(
        "peer faults, subscription [{:?}]: subscribe with the wallet slow {slow_subscribe:.2?}, \
         down {down_subscribe:.2?}; {} replies held past the timeout, {} connections refused; \
         all recorded {recovered:.2?} after the wallet came back; 3 accounts x 1 grant of 1000; \
         VerifyLedger {} entries, 0 violations; total {:.1?}",
        testing::backend(),
        s.proxy.late_replies.load(Ordering::SeqCst),
        s.proxy.refused.load(Ordering::SeqCst),
        report.entries_checked,
        started.elapsed()
    );
    subscription.stop().await.unwrap();
    s.wallet.stop().await.unwrap();
}
