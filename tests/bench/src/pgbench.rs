//! The floor under the PostgreSQL figures: pgbench on a scratch table, the bare `UPDATE` a debit
//! cannot do without, one transaction each, for the same seconds as the scenarios.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

/// One pgbench run.
#[derive(Clone, Debug)]
pub struct Baseline {
    pub name: &'static str,
    pub clients: u32,
    /// Transactions per second, rounded down.
    pub tps: u64,
    /// pgbench's own "latency average" line (ms).
    pub latency_avg_ms: String,
}

/// The two baselines, or why there are none.
pub enum Baselines {
    Ran { hot: Baseline, spread: Baseline },
    Missing(String),
}

/// pgbench on PATH, else in the Debian/Ubuntu server directory.
pub fn find() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("pgbench"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin/pgbench"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        found.pop()
    })
}

const CLIENTS: u32 = 16;
const ROWS: u32 = 10_000;

pub async fn run(url: &str, seconds: u64) -> Baselines {
    let Some(pgbench) = find() else {
        return Baselines::Missing(
            "pgbench not found on PATH nor under /usr/lib/postgresql/*/bin".into(),
        );
    };
    match run_with(&pgbench, url, seconds).await {
        Ok((hot, spread)) => Baselines::Ran { hot, spread },
        Err(e) => Baselines::Missing(format!("pgbench failed: {e:#}")),
    }
}

async fn run_with(
    pgbench: &std::path::Path,
    url: &str,
    seconds: u64,
) -> anyhow::Result<(Baseline, Baseline)> {
    let schema = format!("bench_pgbench_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .context("connecting to PostgreSQL")?;
    for stmt in [
        format!("CREATE SCHEMA {schema}"),
        format!("CREATE TABLE {schema}.hot (id INT PRIMARY KEY, balance BIGINT NOT NULL)"),
        format!("INSERT INTO {schema}.hot VALUES (1, 0)"),
        format!("CREATE TABLE {schema}.spread (id INT PRIMARY KEY, balance BIGINT NOT NULL)"),
        format!("INSERT INTO {schema}.spread SELECT g, 0 FROM generate_series(1, {ROWS}) g"),
        format!("VACUUM ANALYZE {schema}.spread"),
    ] {
        sqlx::query(&stmt).execute(&pool).await?;
    }
    let dir = tempfile::tempdir()?;
    let hot_sql = dir.path().join("hot.sql");
    std::fs::write(
        &hot_sql,
        format!("UPDATE {schema}.hot SET balance = balance - 1 WHERE id = 1;\n"),
    )?;
    let spread_sql = dir.path().join("spread.sql");
    std::fs::write(
        &spread_sql,
        format!(
            "\\set id random(1, {ROWS})\nUPDATE {schema}.spread SET balance = balance - 1 WHERE id = :id;\n"
        ),
    )?;
    let result = async {
        let hot = one(pgbench, url, seconds, &hot_sql, "hot-row UPDATE").await?;
        let spread = one(pgbench, url, seconds, &spread_sql, "spread UPDATE").await?;
        anyhow::Ok((hot, spread))
    }
    .await;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&pool)
        .await?;
    pool.close().await;
    result
}

async fn one(
    pgbench: &std::path::Path,
    url: &str,
    seconds: u64,
    script: &std::path::Path,
    name: &'static str,
) -> anyhow::Result<Baseline> {
    // pgbench stops itself after -T seconds; the wait below is bounded by that.
    let mut cmd = Command::new(pgbench);
    cmd.args(["-n", "-c", &CLIENTS.to_string(), "-j", "2", "-T"])
        .arg(seconds.to_string())
        .arg("-f")
        .arg(script)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(
        Duration::from_secs(seconds + 60),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .context("pgbench did not finish in time")???;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{name}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = |prefix: &str| {
        stdout.lines().find_map(|l| {
            l.trim()
                .strip_prefix(prefix)
                .map(str::trim)
                .map(String::from)
        })
    };
    let tps = line("tps = ")
        .and_then(|v| v.split(['.', ' ']).next().and_then(|n| n.parse().ok()))
        .with_context(|| format!("{name}: no tps line in\n{stdout}"))?;
    let latency_avg_ms = line("latency average = ")
        .map(|v| v.trim_end_matches(" ms").to_string())
        .unwrap_or_default();
    Ok(Baseline {
        name,
        clients: CLIENTS,
        tps,
        latency_avg_ms,
    })
}
