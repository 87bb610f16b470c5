//! Structured logs with `tracing`: text for people, JSON for log shippers. Every line of a call
//! carries the span opened by [`crate::middleware::RequestContextLayer`] (service, method,
//! request id, caller name; never the token).

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber once per process (later calls, e.g. from the suite launcher
/// starting three services, keep the first).
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // Logs go to stderr so that stdout stays for what a launcher prints (addresses).
    let ansi = std::io::stderr().is_terminal();
    let result = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // Already installed: keep the first.
    drop(result);
}
