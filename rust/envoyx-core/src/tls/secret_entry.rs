//! One stored secret and where it came from: what the secret store holds and the
//! file watch re-reads.

use std::time::SystemTime;

use serde_json::Value;

use crate::config::SecretConfig;

/// A secret and where it came from, for `/config_dump`.
#[derive(Debug)]
pub struct SecretEntry {
    pub secret: SecretConfig,
    /// None for the bootstrap's static secrets.
    pub version_info: Option<String>,
    pub last_updated: SystemTime,
    /// The resource as given (its private key redacted when dumped).
    pub raw: Value,
}
