//! `cargo run -p suite`: the three services in one process on the embedded default, with the
//! suite's development defaults where nothing is configured (see the library, [`suite::start`]).

use std::process::ExitCode;

use runtime::{config::ProcessEnv, server};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("suite: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let (log_format, log_filter) = suite::log_settings(&ProcessEnv)?;
    runtime::telemetry::init(log_format, &log_filter);
    let suite = suite::start(&ProcessEnv).await?;
    print!("{}", suite.banner());
    server::shutdown_signal().await;
    tracing::info!("stopping the suite");
    suite.stop().await
}
