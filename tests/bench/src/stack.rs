//! The three services as child processes: the release binaries next to this one, each on a free
//! 127.0.0.1 port, metrics off, its own fresh database, one bearer token with every scope the
//! harness needs.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tonic::{metadata::MetadataValue, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Where the services keep their data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// The PostgreSQL database of the benchmark (the same default as the test suite's).
pub fn postgres_url() -> String {
    std::env::var("BILLING_TEST_POSTGRES_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/billing_test".into())
}

/// One running service process.
pub struct Service {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

/// Resident memory of a process, in KiB, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the peak resident size since the process started.
    pub peak_kib: u64,
}

impl Service {
    pub fn memory(&self) -> Memory {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss_kib: field("VmRSS:"),
            peak_kib: field("VmHWM:"),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Ends our own child, by its handle, and reaps it.
    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The end of the service's log (stderr), for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Service {
    /// A harness that fails half-way leaves no service behind.
    fn drop(&mut self) {
        self.kill();
    }
}

/// The three services of one scenario run, and what must be cleaned up after it.
pub struct Stack {
    pub wallet: Service,
    pub reseller: Service,
    pub subscription: Service,
    /// The bearer token every service accepts (`bench`, scopes read+mutate+admin).
    pub secret: String,
    schemas: Vec<String>,
    _dir: tempfile::TempDir,
}

/// The bearer token of the harness, as request metadata.
#[derive(Clone)]
pub struct Auth(MetadataValue<tonic::metadata::Ascii>);

impl Auth {
    pub fn new(secret: &str) -> anyhow::Result<Auth> {
        Ok(Auth(format!("Bearer {secret}").parse()?))
    }

    /// `msg` as a request with the token and a 10 s deadline.
    pub fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = self.stream_req(msg);
        req.set_timeout(Duration::from_secs(10));
        req
    }

    /// `msg` as a request with the token and no deadline (an event stream stays open).
    pub fn stream_req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert("authorization", self.0.clone());
        req
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    // Bound and released at once: the child binds it a moment later. Another process could
    // take it in between; then the start fails visibly instead of measuring something else.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the services next to the harness first \
             (cargo build --release -p bench -p credits-wallet -p reseller-billing -p subscription)",
            path.display()
        );
    }
    Ok(path)
}

impl Stack {
    /// Starts wallet, then reseller-billing and subscription pointed at it, and waits until
    /// each answers health SERVING. With `webhook`, the wallet delivers its events to it (the
    /// sink `webhook:bench`, every event type).
    pub async fn start(
        backend: Backend,
        webhook: Option<&crate::events::Receiver>,
    ) -> anyhow::Result<Stack> {
        let exe = std::env::current_exe()?;
        let bin_dir = exe
            .parent()
            .context("the harness binary has no parent directory")?
            .to_path_buf();
        let dir = tempfile::Builder::new()
            .prefix("billing-bench-")
            .tempdir()?;
        let run = uuid::Uuid::new_v4().simple().to_string();
        let secret = format!("bench-{run}");
        let tokens = format!("bench:{secret}:read+mutate+admin");
        let mut schemas = Vec::new();

        let wallet_addr = free_port()?;
        let peer = [
            ("PEER_WALLET_URL", format!("http://{wallet_addr}")),
            ("PEER_WALLET_TOKEN", secret.clone()),
        ];
        // (binary, env prefix, database file and schema suffix, address, calls the wallet)
        let plan = [
            ("credits-wallet", "WALLET", "wallet", wallet_addr, false),
            (
                "reseller-billing",
                "RESELLER",
                "reseller",
                free_port()?,
                true,
            ),
            (
                "subscription",
                "SUBSCRIPTION",
                "subscription",
                free_port()?,
                true,
            ),
        ];
        let mut started = Vec::new();
        for (name, prefix, file, addr, calls_wallet) in plan {
            let log = dir.path().join(format!("{name}.log"));
            let mut cmd = Command::new(binary(&bin_dir, name)?);
            cmd.env_remove(format!("{prefix}_CONFIG"))
                .env(format!("{prefix}_LISTEN_ADDR"), addr.to_string())
                .env(format!("{prefix}_METRICS_ADDR"), "off")
                .env(format!("{prefix}_TOKENS"), &tokens)
                .env(format!("{prefix}_LOG_FILTER"), "warn")
                .env(format!("{prefix}_CONCURRENCY_LIMIT"), "4096")
                // As the images set it (deploy/docker/Dockerfile): two glibc malloc arenas, and
                // blocks of 128 KiB and more mapped on their own, so freeing one returns it.
                .env("MALLOC_ARENA_MAX", "2")
                .env("MALLOC_MMAP_THRESHOLD_", "131072")
                .env("MALLOC_TRIM_THRESHOLD_", "131072");
            match backend {
                Backend::Sqlite => {
                    cmd.env(
                        format!("{prefix}_DATABASE_URL"),
                        format!("sqlite://{}/{file}.db", dir.path().display()),
                    );
                }
                Backend::Postgres => {
                    let schema = format!("bench_{run}_{file}");
                    cmd.env(format!("{prefix}_DATABASE_URL"), postgres_url())
                        .env(format!("{prefix}_DATABASE_SCHEMA"), &schema);
                    schemas.push(schema);
                }
            }
            if calls_wallet {
                for (key, value) in &peer {
                    cmd.env(format!("{prefix}_{key}"), value);
                }
            }
            if let (Some(rx), "WALLET") = (webhook, prefix) {
                let name = crate::events::NAME;
                let var = format!("{prefix}_WEBHOOK_{}", name.to_uppercase());
                cmd.env(format!("{prefix}_WEBHOOKS"), name)
                    .env(format!("{var}_URL"), rx.url(file))
                    .env(format!("{var}_SECRET"), &rx.secret);
            }
            if prefix == "SUBSCRIPTION" {
                // The renewal scenario moves the subscription clock; nothing else reads it.
                cmd.env("SUBSCRIPTION_TEST_CLOCK", "true");
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&log)?));
            let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
            started.push(Service {
                name,
                addr,
                child,
                log,
            });
        }
        let mut it = started.into_iter();
        let (Some(wallet), Some(reseller), Some(subscription)) = (it.next(), it.next(), it.next())
        else {
            bail!("three services were planned");
        };
        let mut stack = Stack {
            wallet,
            reseller,
            subscription,
            secret,
            schemas,
            _dir: dir,
        };
        for svc in [
            &mut stack.wallet,
            &mut stack.reseller,
            &mut stack.subscription,
        ] {
            wait_serving(svc).await?;
        }
        Ok(stack)
    }

    pub fn services(&self) -> [&Service; 3] {
        [&self.wallet, &self.reseller, &self.subscription]
    }

    /// Stops the children and drops their PostgreSQL schemas.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for svc in [&mut self.wallet, &mut self.reseller, &mut self.subscription] {
            svc.kill();
        }
        if !self.schemas.is_empty() {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&postgres_url())
                .await?;
            for schema in &self.schemas {
                // The killed services' sessions may still hold locks for a moment (PostgreSQL
                // notices the closed sockets on its own time): a drop can meet them and fail
                // with a deadlock. Try again shortly; the schema is ours alone.
                let mut tries = 0;
                loop {
                    let dropped = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&pool)
                        .await;
                    match dropped {
                        Ok(_) => break,
                        Err(e) if tries < 10 => {
                            tries += 1;
                            eprintln!("bench: dropping {schema} failed ({e}); retrying");
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            pool.close().await;
        }
        Ok(())
    }
}

async fn wait_serving(svc: &mut Service) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = svc.child.try_wait()? {
            bail!(
                "{} exited at start ({status}):\n{}",
                svc.name,
                svc.log_tail()
            );
        }
        if let Ok(channel) = Channel::from_shared(svc.url())?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
        {
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if let Ok(resp) = answer
                && resp.into_inner().status == ServingStatus::Serving as i32
            {
                return Ok(());
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{} not SERVING after 60 s:\n{}", svc.name, svc.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` HTTP/2 connections to `url`.
pub async fn channels(url: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            Channel::from_shared(url.to_string())?
                .timeout(Duration::from_secs(15))
                .connect()
                .await?,
        );
    }
    Ok(out)
}
