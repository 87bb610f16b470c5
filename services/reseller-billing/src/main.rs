//! The reseller-billing service binary: configuration from `RESELLER_CONFIG` and `RESELLER_*`
//! environment variables, serve until SIGTERM or Ctrl-C.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    runtime::server::run_main(&reseller_billing::SPEC, reseller_billing::routes).await
}
