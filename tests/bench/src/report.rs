//! Printing: the machine, one block per scenario run, and a Markdown summary table (the one
//! docs/benchmarks.md quotes). Integer arithmetic only, like the rest of the suite.

use crate::{
    pgbench::{Baseline, Baselines},
    scenarios::{Outcome, Settings},
    stack::Backend,
};

/// Microseconds as milliseconds with one decimal.
fn ms(micros: u32) -> String {
    format!("{}.{}", micros / 1000, (micros % 1000) / 100)
}

/// KiB as MiB with one decimal.
fn mib(kib: u64) -> String {
    format!("{}.{}", kib / 1024, (kib % 1024) * 10 / 1024)
}

/// `ours / theirs` with two decimals.
fn ratio(ours: u64, theirs: u64) -> String {
    if theirs == 0 {
        return "-".into();
    }
    let x100 = ours * 100 / theirs;
    format!("{}.{:02}x", x100 / 100, x100 % 100)
}

fn seconds(d: std::time::Duration) -> String {
    format!("{}.{}", d.as_secs(), d.subsec_millis() / 100)
}

/// nproc, memory and CPU model, as the documentation records them.
pub fn machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "# billing-suite benchmark\n\nmachine: {cpus} CPUs ({model}), {} GiB memory; build: {}",
        mem_kib / 1024 / 1024,
        if cfg!(debug_assertions) {
            "DEBUG (figures not representative)"
        } else {
            "release"
        }
    );
}

pub fn outcome(o: &Outcome) {
    let t = &o.tally;
    let errors = if t.errors.is_empty() {
        "none".to_string()
    } else {
        t.errors
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let memory = o
        .memory
        .iter()
        .map(|(name, idle, end)| {
            format!("{name} {} -> peak {}", mib(idle.rss_kib), mib(end.peak_kib))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let unit = if o.scenario == "renewals" {
        "renewals"
    } else {
        "calls"
    };
    let half = match &o.half {
        Some((rate, h)) => format!(
            "\nopen loop, {rate} steps/s offered (half the throughput above, or --rate) for {} s: ok {}, errors {}; latency p50 {} ms, p99 {} ms, max {} ms",
            seconds(h.elapsed),
            h.ok,
            h.errors.values().sum::<u64>(),
            ms(h.permille(500)),
            ms(h.permille(990)),
            ms(h.permille(1000)),
        ),
        None => String::new(),
    };
    let postgres = match &o.postgres {
        Some(a) => {
            let calls = t.ok + o.half.as_ref().map_or(0, |(_, h)| h.ok);
            format!(
                "\npostgres from the load to the end of the check: checkpoints {} timed, {} requested; WAL {} MiB ({} bytes per successful {}), {} full-page images",
                a.checkpoints_timed,
                a.checkpoints_requested,
                mib(u64::try_from(a.wal_bytes / 1024).unwrap_or(0)),
                u64::try_from(a.wal_bytes).unwrap_or(0) / calls.max(1),
                unit.trim_end_matches('s'),
                a.full_page_images,
            )
        }
        None => String::new(),
    };
    println!(
        "\n## {} ({})\n{}; setup {} s (not timed)\n{unit} {} in {} s: ok {}, errors: {errors}\nthroughput {} {unit}/s; latency p50 {} ms, p99 {} ms, max {} ms{half}\nmemory MiB (RSS before load -> VmHWM at end): {memory}{postgres}\ncheck: {}",
        o.scenario,
        o.backend.name(),
        o.what,
        seconds(o.setup),
        t.calls(),
        seconds(t.elapsed),
        t.ok,
        t.throughput(),
        ms(t.permille(500)),
        ms(t.permille(990)),
        ms(t.permille(1000)),
        match &o.check {
            Ok(s) => s.clone(),
            Err(e) => format!("FAILED: {e}"),
        }
    );
    match &o.events {
        Some(Ok(f)) => println!("{}", events_line(f)),
        Some(Err(e)) => println!("webhook: FAILED: {e}"),
        None => {}
    }
}

/// The `--webhook` figures of one full-speed load.
fn events_line(f: &crate::events::Figures) -> String {
    let micros = f.load.as_micros().max(1);
    let per_s = |n: u64| u128::from(n) * 1_000_000 / micros;
    format!(
        "webhook (wallet, sink webhook:bench; setup's events drained in {} s before the load): {} events produced in {} s ({}/s), {} delivered during the load ({}/s), {} in all; lag (arrival - created_at) p50 {} ms, p99 {} ms, max {} ms; backlog drained {} s after the load ended; {} duplicates, {} refused",
        seconds(f.setup_drain),
        f.produced,
        seconds(f.load),
        per_s(f.produced),
        f.delivered_during,
        per_s(f.delivered_during),
        f.delivered,
        ms_i(f.lag_p50_us),
        ms_i(f.lag_p99_us),
        ms_i(f.lag_max_us),
        seconds(f.drain),
        f.duplicates,
        f.refused,
    ) + &format!(
        "\n  every 0.5 s of the load, events with a cursor / acknowledged by the webhook: {}",
        f.samples
            .iter()
            .map(|(h, a)| format!("{h}/{a}"))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Signed microseconds as milliseconds with one decimal.
fn ms_i(us: i64) -> String {
    let sign = if us < 0 { "-" } else { "" };
    let abs = us.unsigned_abs();
    format!("{sign}{}.{}", abs / 1000, (abs % 1000) / 100)
}

fn baseline_for<'a>(scenario: &str, baselines: Option<&'a Baselines>) -> Option<&'a Baseline> {
    match (scenario, baselines?) {
        ("spread" | "reserve-capture", Baselines::Ran { spread, .. }) => Some(spread),
        ("hot" | "reseller-hot", Baselines::Ran { hot, .. }) => Some(hot),
        _ => None,
    }
}

pub fn summary(outcomes: &[Outcome], baselines: Option<&Baselines>, settings: &Settings) {
    println!(
        "\n## Summary ({} s per scenario)\n\n| scenario | backend | callers | calls | errors | calls/s | p50 ms | p99 ms | max ms | p99 ms at ½ rate | vs pgbench | RSS MiB before → peak (wallet / reseller / subscription) | check |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
        settings.seconds
    );
    for o in outcomes {
        let t = &o.tally;
        let errors: u64 = t.errors.values().sum();
        let vs = match baseline_for(o.scenario, baselines) {
            Some(b) if o.backend == Backend::Postgres => ratio(t.throughput(), b.tps),
            _ => "-".into(),
        };
        let memory = o
            .memory
            .iter()
            .map(|(_, idle, end)| format!("{} → {}", mib(idle.rss_kib), mib(end.peak_kib)))
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            o.scenario,
            o.backend.name(),
            if o.scenario == "renewals" {
                "-".to_string()
            } else {
                t.tasks.to_string()
            },
            t.calls(),
            errors,
            t.throughput(),
            ms(t.permille(500)),
            ms(t.permille(990)),
            ms(t.permille(1000)),
            o.half
                .as_ref()
                .map_or_else(|| "-".to_string(), |(_, h)| ms(h.permille(990))),
            vs,
            memory,
            if o.check.is_ok() { "ok" } else { "FAILED" }
        );
    }
    let with_events: Vec<_> = outcomes
        .iter()
        .filter_map(|o| Some((o, o.events.as_ref()?)))
        .collect();
    if !with_events.is_empty() {
        println!(
            "\nWebhook (--webhook): the wallet's events of each full-speed load, delivered to the harness's receiver\n\n| scenario | backend | events produced | produced/s | delivered during the load | delivered/s | lag p50 ms | lag p99 ms | lag max ms | drained after the load, s |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
        );
        for (o, figures) in with_events {
            match figures {
                Ok(f) => {
                    let micros = f.load.as_micros().max(1);
                    let per_s = |n: u64| u128::from(n) * 1_000_000 / micros;
                    println!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        o.scenario,
                        o.backend.name(),
                        f.produced,
                        per_s(f.produced),
                        f.delivered_during,
                        per_s(f.delivered_during),
                        ms_i(f.lag_p50_us),
                        ms_i(f.lag_p99_us),
                        ms_i(f.lag_max_us),
                        seconds(f.drain),
                    );
                }
                Err(e) => println!(
                    "| {} | {} | FAILED: {e} | | | | | | | |",
                    o.scenario,
                    o.backend.name()
                ),
            }
        }
    }
    match baselines {
        Some(Baselines::Ran { hot, spread }) => {
            println!(
                "\npgbench on the same PostgreSQL, {} s each, one UPDATE per transaction:\n",
                settings.seconds
            );
            for b in [hot, spread] {
                println!(
                    "- {}: {} tps with {} clients, latency average {} ms",
                    b.name, b.tps, b.clients, b.latency_avg_ms
                );
            }
            println!(
                "\n\"vs pgbench\" = our successful calls/s on PostgreSQL / pgbench tps (hot and reseller-hot against the hot-row UPDATE, spread and reserve-capture against the spread UPDATE)."
            );
        }
        Some(Baselines::Missing(why)) => println!("\npgbench: not run ({why})"),
        None => println!("\npgbench: not run (PostgreSQL backend not selected)"),
    }
}
