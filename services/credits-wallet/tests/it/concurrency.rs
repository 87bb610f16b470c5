//! Many simultaneous charges on one wallet, from two replicas sharing one database, never
//! overdraw and never lose or double a debit: correctness comes from the database.

use std::{net::TcpListener, process::Stdio, time::Duration};

use futures::future::join_all;
use proto::wallet::v1::{self as pb, credits_wallet_client::CreditsWalletClient};
use runtime::testing::{ADMIN_TOKEN, TestDatabase, authed};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::Harness;

const WALLET_CREDITS: u64 = 30_000;
const CALLERS: usize = 64;

/// 64 charges of 1,000 credits against 30,000: exactly 30 succeed, whichever replica serves.
async fn race(clients: Vec<CreditsWalletClient<Channel>>) -> (usize, usize) {
    let calls = (0..CALLERS).map(|i| {
        let mut c = clients[i % clients.len()].clone();
        async move {
            c.charge_mailing(authed(
                ADMIN_TOKEN,
                pb::ChargeMailingRequest {
                    idempotency_key: format!("race-{i}"),
                    wallet_id: "hot".into(),
                    mailing_id: format!("m{i}"),
                    recipients: 1_000,
                },
            ))
            .await
        }
    });
    let results = join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::FailedPrecondition))
        .count();
    (ok, refused)
}

#[tokio::test]
async fn two_replicas_in_one_process_never_overdraw_nor_lose_a_debit() {
    let a = Harness::start().await;
    let b = Harness::start_on(a.db.share()).await;
    a.open("hot", "1", 0).await;
    a.grant("hot", WALLET_CREDITS).await;
    let (ok, refused) = race(vec![a.client.clone(), b.client.clone()]).await;
    assert_eq!((ok, refused), (30, CALLERS - 30));
    let w = b.wallet("hot").await;
    assert_eq!((w.balance, w.available), (0, 0));
    assert_eq!(a.ledger("hot").await.len(), 31);
    a.assert_ledger_balances("hot").await;
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A wallet service process; killed when dropped.
pub(crate) struct Process(pub(crate) std::process::Child);

impl Process {
    /// Kills the process with SIGKILL (what `Child::kill` sends on unix): no drain, no
    /// shutdown hook, transactions in flight cut off. Waits until it is gone.
    pub(crate) fn kill_now(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the service binary on `db` at a free port and waits until it is healthy.
pub(crate) async fn spawn_replica(db: &TestDatabase) -> (Process, Channel) {
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_credits-wallet"))
        .env("WALLET_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("WALLET_METRICS_ADDR", "off")
        .env("WALLET_DATABASE_URL", &db.url)
        .env("WALLET_DATABASE_SCHEMA", &db.schema)
        .env(
            "WALLET_TOKENS",
            format!("test:{ADMIN_TOKEN}:read+mutate+admin"),
        )
        .env("WALLET_LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let process = Process(child);
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await
            && HealthClient::new(ch.clone())
                .check(HealthCheckRequest::default())
                .await
                .is_ok()
        {
            return (process, ch);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("replica on port {port} never became healthy");
}

#[tokio::test]
async fn two_service_processes_on_one_database_never_overdraw_nor_lose_a_debit() {
    let setup = Harness::start().await;
    setup.open("hot", "1", 0).await;
    setup.grant("hot", WALLET_CREDITS).await;
    let (_p1, ch1) = spawn_replica(&setup.db).await;
    let (_p2, ch2) = spawn_replica(&setup.db).await;
    let (ok, refused) = race(vec![
        CreditsWalletClient::new(ch1),
        CreditsWalletClient::new(ch2),
    ])
    .await;
    assert_eq!((ok, refused), (30, CALLERS - 30));
    let w = setup.wallet("hot").await;
    assert_eq!((w.balance, w.available), (0, 0));
    assert_eq!(setup.ledger("hot").await.len(), 31);
    setup.assert_ledger_balances("hot").await;
}
