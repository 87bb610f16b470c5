//! The one error of configuration loading.

/// A configuration problem, named precisely enough to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A setting has a value that cannot be used.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The TOML key or environment variable.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

pub(super) fn invalid(key: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}
