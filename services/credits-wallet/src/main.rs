//! The credits-wallet service binary: configuration from `WALLET_CONFIG` and `WALLET_*`
//! environment variables, serve until SIGTERM or Ctrl-C.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    runtime::server::run_main(&credits_wallet::SPEC, credits_wallet::routes).await
}
