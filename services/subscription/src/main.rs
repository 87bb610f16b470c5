//! The subscription service binary: configuration from `SUBSCRIPTION_CONFIG` and `SUBSCRIPTION_*`
//! environment variables, serve until SIGTERM or Ctrl-C.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    runtime::server::run_main(&subscription::SPEC, subscription::routes).await
}
