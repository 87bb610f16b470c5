//! The benchmark harness of issue 7.
//!
//! ```sh
//! cargo build --release -p bench -p credits-wallet -p reseller-billing -p subscription
//! cargo run --release -p bench -- [--backend sqlite|postgres|both] [--seconds N] [--scenario NAME]
//! cargo run --release -p bench -- --webhook --scenario opens   # events out: delivery lag
//! ```
//!
//! Starts the three service binaries next to this one as child processes (fresh database each,
//! one set per scenario and backend), drives them through the generated gRPC clients from
//! concurrent tokio tasks for a fixed time, and prints per scenario and backend: calls, errors by
//! code, throughput, latency percentiles, each service's memory, pgbench ratios on PostgreSQL,
//! and a correctness check of the ledgers. Everything runs on 127.0.0.1.

mod events;
mod load;
mod pgbench;
mod pgstats;
mod report;
mod scenarios;
mod stack;

use std::process::ExitCode;

use anyhow::{Context, bail};
use scenarios::Settings;
use stack::Backend;

const USAGE: &str = "\
usage: bench [--backend sqlite|postgres|both] [--seconds N] [--scenario NAME|all]
             [--wallets N] [--customers N] [--renewals N] [--tasks N] [--no-half-rate]
             [--rate N] [--webhook]

  --backend    where the services keep their data (default sqlite); postgres uses
               BILLING_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/billing_test)
  --seconds    timed load per scenario, 1..=120 (default 10)
  --scenario   spread, hot, reseller-hot, reserve-capture, opens, renewals or all (default all)
  --wallets    wallets of spread and reserve-capture (default 10000)
  --customers  partner-pays customers of reseller-hot (default 1000)
  --renewals   subscriptions renewed by the renewals scenario (default 2000)
  --tasks      concurrent callers of every scenario (default 128 spread and reserve-capture,
               256 hot and reseller-hot)
  --no-half-rate  skip the second, open-loop run of each load scenario at half its
               measured throughput (the latency-at-half-rate figure)
  --rate       offer the open-loop run at N steps/s instead of half the measured throughput
               (compares two builds' latency at the same load; reported as the same column)
  --webhook    the wallet delivers its events to a webhook receiver in the harness; each load
               scenario also reports the events its full-speed run produced and delivered,
               their delivery lag (arrival - created_at) and how long the backlog took to drain
               after the load (the setup's events are drained before the load starts)";

struct Args {
    backends: Vec<Backend>,
    scenarios: Vec<&'static str>,
    settings: Settings,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut backends = vec![Backend::Sqlite];
    let mut scenarios: Vec<&'static str> = scenarios::ALL.to_vec();
    let mut settings = Settings {
        seconds: 10,
        wallets: 10_000,
        customers: 1_000,
        renewals: 2_000,
        tasks: None,
        half_rate: true,
        rate: None,
        webhook: false,
    };
    let number = |flag: &str, v: Option<String>, max: usize| -> anyhow::Result<usize> {
        let n: usize = v
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("{flag}: not a number"))?;
        if n == 0 || n > max {
            bail!("{flag}: 1..={max}");
        }
        Ok(n)
    };
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--backend" => {
                backends = match args.next().as_deref() {
                    Some("sqlite") => vec![Backend::Sqlite],
                    Some("postgres") => vec![Backend::Postgres],
                    Some("both") => vec![Backend::Sqlite, Backend::Postgres],
                    other => bail!("--backend: sqlite, postgres or both, not {other:?}"),
                }
            }
            "--seconds" => settings.seconds = number("--seconds", args.next(), 120)? as u64,
            "--scenario" => {
                scenarios = match args.next() {
                    Some(s) if s == "all" => scenarios::ALL.to_vec(),
                    Some(s) => match scenarios::ALL.iter().find(|n| **n == s) {
                        Some(n) => vec![*n],
                        None => bail!("--scenario: one of {} or all", scenarios::ALL.join(", ")),
                    },
                    None => bail!("--scenario needs a value"),
                }
            }
            "--wallets" => settings.wallets = number("--wallets", args.next(), 100_000)?,
            "--customers" => settings.customers = number("--customers", args.next(), 100_000)?,
            "--renewals" => settings.renewals = number("--renewals", args.next(), 100_000)?,
            "--tasks" => settings.tasks = Some(number("--tasks", args.next(), 4096)?),
            "--no-half-rate" => settings.half_rate = false,
            "--webhook" => settings.webhook = true,
            "--rate" => settings.rate = Some(number("--rate", args.next(), 1_000_000)? as u64),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Args {
        backends,
        scenarios,
        settings,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every chosen scenario on every chosen backend; false when a correctness check failed.
async fn run(args: Args) -> anyhow::Result<bool> {
    report::machine();
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for backend in &args.backends {
        for name in &args.scenarios {
            eprintln!("running {name} on {} ...", backend.name());
            match scenarios::run(name, *backend, &args.settings).await {
                Ok(outcome) => {
                    report::outcome(&outcome);
                    outcomes.push(outcome);
                }
                Err(e) => {
                    let msg = format!("{name} on {}: {e:#}", backend.name());
                    println!("\n## {name} ({})\nFAILED TO RUN: {e:#}", backend.name());
                    failures.push(msg);
                }
            }
        }
    }
    let baselines = if args.backends.contains(&Backend::Postgres) {
        eprintln!("running pgbench ...");
        Some(pgbench::run(&stack::postgres_url(), args.settings.seconds).await)
    } else {
        None
    };
    report::summary(&outcomes, baselines.as_ref(), &args.settings);
    let checks_ok = outcomes.iter().all(|o| o.check.is_ok());
    for f in &failures {
        eprintln!("bench: {f}");
    }
    Ok(checks_ok && failures.is_empty())
}
