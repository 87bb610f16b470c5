//! `verify-ledger`: the checks of the `VerifyLedger` RPC (see `credits_wallet::verify`), run from
//! the command line against the wallet's database, with no service running:
//!
//! ```text
//! WALLET_DATABASE_URL=postgres://... WALLET_DATABASE_SCHEMA=wallet \
//!     cargo run -p credits-wallet --bin verify-ledger [-- --outbox-grace-seconds N]
//! ```
//!
//! `WALLET_DATABASE_URL` defaults to the service's own default (`sqlite://data/credits-wallet.db`),
//! `WALLET_DATABASE_SCHEMA` to `wallet`. The database is opened read-only and not migrated.
//! Prints a summary and one line per violation to stdout (a report is this tool's output, so it
//! prints rather than logs). Exit code: 0 sound, 1 violations found, 2 could not verify.

use std::{process::ExitCode, time::Duration};

use credits_wallet::verify;

const USAGE: &str = "usage: verify-ledger [--outbox-grace-seconds N]\n\
    reads WALLET_DATABASE_URL (default sqlite://data/credits-wallet.db) and \
    WALLET_DATABASE_SCHEMA (default wallet)";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn outbox_grace(args: &[String]) -> Result<Duration, String> {
    match args {
        [] => Ok(verify::DEFAULT_OUTBOX_GRACE),
        [flag, n] if flag == "--outbox-grace-seconds" => n
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("--outbox-grace-seconds: {n:?} is not a whole number")),
        _ => Err(USAGE.to_string()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let grace = match outbox_grace(&args) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("verify-ledger: {e}");
            return ExitCode::from(2);
        }
    };
    let defaults = &credits_wallet::DEFAULTS;
    let url = env_or(
        "WALLET_DATABASE_URL",
        &format!("sqlite://data/{}.db", defaults.name),
    );
    let schema = env_or("WALLET_DATABASE_SCHEMA", defaults.schema);
    let options = verify::Options {
        now: chrono::Utc::now(),
        outbox_grace: grace,
    };
    let report = match verify::connect_read_only(&url, &schema).await {
        Ok((pool, backend)) => {
            let report = verify::verify(&pool, backend, &options).await;
            pool.close().await;
            report
        }
        Err(e) => Err(e),
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("verify-ledger: cannot verify the database: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "checked {} wallets, {} ledger entries, {} purchases, {} outbox events ({} undelivered)",
        report.wallets_checked,
        report.entries_checked,
        report.purchases_checked,
        report.outbox_events_checked,
        report.outbox_undelivered
    );
    for v in &report.violations {
        let wallet = if v.wallet_id.is_empty() {
            "(outbox)"
        } else {
            &v.wallet_id
        };
        println!("VIOLATION {wallet} {}: {}", v.check.as_str(), v.detail);
    }
    if report.is_clean() {
        println!("no violation");
        ExitCode::SUCCESS
    } else {
        if report.violations_total > report.violations.len() as u64 {
            println!(
                "... {} violations in all, the first {} listed",
                report.violations_total,
                report.violations.len()
            );
        }
        ExitCode::from(1)
    }
}
