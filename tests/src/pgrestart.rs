//! A PostgreSQL restart under load: the test starts a private PostgreSQL instance of its own
//! (initdb into a temporary directory, a free port; as the `postgres` user when the test runs as
//! root, as CI does), runs the wallet on it, and restarts the server with `pg_ctl restart` while
//! callers make charges. The wallet is not restarted: its pool reconnects. The shared server on
//! port 5432 is never touched.
//!
//! Runs with `BILLING_TEST_BACKEND=postgres` only (on SQLite there is no server to restart), and
//! skips with a printed reason when the PostgreSQL server binaries are not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use proto::wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient};
use runtime::testing::{self, ADMIN_TOKEN, TestBackend, authed};
use tonic::Code;

use crate::channel;

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb` and `pg_ctl`.
fn server_binaries() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// A private PostgreSQL server; stopped (immediately) when dropped.
struct PrivateServer {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PrivateServer {
    /// Runs `tool` of the server binaries, as `postgres` when this process is root.
    fn run(&self, tool: &str, args: &[&str]) {
        run_as_owner(&self.bin.join(tool), args);
    }

    fn start(bin: PathBuf) -> PrivateServer {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown the temporary directory");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = PrivateServer {
            bin,
            data,
            port,
            _dir: dir,
        };
        let data = server.data.to_str().unwrap().to_string();
        server.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            server._dir.path().display()
        );
        let log = server._dir.path().join("server.log");
        server.run(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        server
    }

    /// The postmaster's process id (the first line of `postmaster.pid`).
    fn postmaster_pid(&self) -> String {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap_or_default();
        text.lines().next().unwrap_or_default().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn restart(&self) {
        let data = self.data.to_str().unwrap().to_string();
        // With its log file again: otherwise the new server writes to (and holds open) this
        // process's pipe, and waiting for pg_ctl's output would never end.
        let log = self._dir.path().join("server.log");
        let log = log.to_str().unwrap();
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", log, "-m", "fast", "-w", "restart"],
        );
    }
}

fn run_as_owner(tool: &Path, args: &[&str]) {
    let output = if is_root() {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(tool)
            .args(args)
            .output()
    } else {
        Command::new(tool).args(args).output()
    }
    .unwrap();
    assert!(
        output.status.success(),
        "{} {args:?}: {}{}",
        tool.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let data = self.data.to_str().unwrap_or_default().to_string();
        let tool = self.bin.join("pg_ctl");
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&tool)
                .args(args)
                .output()
        } else {
            Command::new(&tool).args(args).output()
        };
    }
}

const CALLERS: usize = 8;
const CHARGES_PER_CALLER: usize = 25;
const WALLETS: usize = 4;

#[tokio::test]
async fn a_wallet_keeps_serving_across_a_postgresql_restart_and_loses_or_doubles_nothing() {
    if testing::backend() != TestBackend::Postgres {
        eprintln!(
            "pgrestart: skipped on SQLite (no database server to restart); runs with \
             BILLING_TEST_BACKEND=postgres"
        );
        return;
    }
    let Some(bin) = server_binaries() else {
        eprintln!(
            "pgrestart: skipped: no PostgreSQL server binaries (initdb, pg_ctl) under \
             /usr/lib/postgresql/*/bin"
        );
        return;
    };
    let _alone = crate::PG_SERVER_TESTS.lock().await;
    let started = Instant::now();
    let server = PrivateServer::start(bin);
    let mut db = testing::TestDatabase::fresh();
    db.url = server.url();
    let wallet = runtime::server::start(
        &credits_wallet::SPEC,
        testing::config(&credits_wallet::DEFAULTS, &db),
        credits_wallet::routes,
    )
    .await
    .unwrap();
    let client = CreditsWalletClient::new(channel(&wallet).await.unwrap());
    for w in 0..WALLETS {
        let mut c = client.clone();
        c.open_wallet(authed(
            ADMIN_TOKEN,
            wpb::OpenWalletRequest {
                idempotency_key: format!("open-{w}"),
                wallet_id: format!("w{w}"),
                currency: "EUR".into(),
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
                signup_credits: 0,
                signup_credits_expire_at: None,
            },
        ))
        .await
        .unwrap();
        c.grant_credits(authed(
            ADMIN_TOKEN,
            wpb::GrantCreditsRequest {
                idempotency_key: format!("grant-{w}"),
                wallet_id: format!("w{w}"),
                credits: 10_000,
                kind: wpb::LotKind::Promotional as i32,
                expires_at: None,
                reference: "start".into(),
            },
        ))
        .await
        .unwrap();
    }

    let answered = Arc::new(AtomicU64::new(0));
    let failed_attempts = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (client, answered, failed) =
                (client.clone(), answered.clone(), failed_attempts.clone());
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for i in 0..CHARGES_PER_CALLER {
                    let req = wpb::ChargeMailingRequest {
                        idempotency_key: format!("send-{caller}-{i}"),
                        wallet_id: format!("w{}", caller % WALLETS),
                        mailing_id: format!("m-{caller}-{i}"),
                        recipients: 100,
                    };
                    let until = Instant::now() + Duration::from_secs(30);
                    loop {
                        match client
                            .clone()
                            .charge_mailing(authed(ADMIN_TOKEN, req.clone()))
                            .await
                        {
                            Ok(_) => break,
                            Err(s) if s.code() == Code::Unavailable && Instant::now() < until => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                codes.push(s.code());
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(s) => panic!("send-{caller}-{i}: {s:?}"),
                        }
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                codes
            })
        })
        .collect();

    // Restart once a few calls have been answered, while the rest run.
    let until = Instant::now() + Duration::from_secs(20);
    while answered.load(Ordering::SeqCst) < 10 {
        assert!(Instant::now() < until, "no call was answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answered_before = answered.load(Ordering::SeqCst);
    let pid_before = server.postmaster_pid();
    let t = Instant::now();
    let restart_server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    });
    let server = restart_server.await.unwrap();
    let restart_took = t.elapsed();
    let answered_at_restart = answered.load(Ordering::SeqCst);
    assert_ne!(
        server.postmaster_pid(),
        pid_before,
        "the server was restarted"
    );
    assert!(
        answered_at_restart < u64::try_from(CALLERS * CHARGES_PER_CALLER).unwrap(),
        "calls were still running when the server came back"
    );
    let mut codes = Vec::new();
    for caller in callers {
        codes.extend(caller.await.unwrap());
    }

    // A new call succeeds at the first attempt: the pool has reconnected.
    client
        .clone()
        .charge_mailing(authed(
            ADMIN_TOKEN,
            wpb::ChargeMailingRequest {
                idempotency_key: "after".into(),
                wallet_id: "w0".into(),
                mailing_id: "m-after".into(),
                recipients: 100,
            },
        ))
        .await
        .unwrap();
    let mut entries_total = 0;
    for w in 0..WALLETS {
        let entries = client
            .clone()
            .list_ledger_entries(authed(
                ADMIN_TOKEN,
                wpb::ListLedgerEntriesRequest {
                    wallet_id: format!("w{w}"),
                    page_size: 500,
                    page_token: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .entries;
        let sends = CALLERS / WALLETS * CHARGES_PER_CALLER + usize::from(w == 0);
        for caller in (0..CALLERS).filter(|c| c % WALLETS == w) {
            for i in 0..CHARGES_PER_CALLER {
                let reference = format!("mailing:m-{caller}-{i}");
                let n = entries.iter().filter(|e| e.reference == reference).count();
                assert_eq!(n, 1, "{reference} in w{w}'s ledger once");
            }
        }
        assert_eq!(
            entries.len(),
            1 + sends,
            "w{w}: the grant and each send once"
        );
        let balance = entries.last().unwrap().balance_after;
        assert_eq!(
            balance,
            10_000 - 100 * i64::try_from(sends).unwrap(),
            "w{w}"
        );
        entries_total += entries.len();
    }
    let report = client
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
    eprintln!(
        "pgrestart: {} charges by {CALLERS} callers, {answered_before} answered before the \
         restart, {answered_at_restart} when it was back; pg_ctl restart took {restart_took:.2?}; {} failed attempts (all UNAVAILABLE, \
         retried with their keys); 0 lost, 0 doubled; a new call succeeded at once; VerifyLedger \
         {} entries ({entries_total} listed), 0 violations; total {:.1?}",
        CALLERS * CHARGES_PER_CALLER,
        failed_attempts.load(Ordering::SeqCst),
        report.entries_checked,
        started.elapsed()
    );
    wallet.stop().await.unwrap();
    drop(server);
}
