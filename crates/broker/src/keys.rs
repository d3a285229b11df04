//! The broker's ticket-signing key: read from the data directory, generated there (mode 0600)
//! on first start. Relays fetch the public half from `GET /v1/keys`.
//!
//! What it does not do: no rotation schedule. To rotate, move the old key's public half to
//! `extra_ticket_keys` in the config, delete the seed file and restart; relays that refresh
//! `/v1/keys` trust both until the old tickets have expired.

use std::io::Write;
use std::path::Path;

use steelyard_proto::api::PublicKeyInfo;
use steelyard_proto::hex;
use steelyard_proto::ticket::{KeyId, TicketSigner};

/// The file in the data directory that holds the signing key's seed (64 hex digits).
pub const SEED_FILE: &str = "ticket-signing-key.seed";

/// Why the key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the file failed.
    #[error("ticket signing key {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not hold 64 hex digits.
    #[error("ticket signing key {path} is not 64 hex digits; restore it from a backup or delete it to generate a new key (relays must then fetch /v1/keys again)")]
    Malformed {
        /// The file.
        path: String,
    },
    /// No randomness.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// Loads the signer from `dir`, generating a new key there if none exists. Returns whether it
/// was generated.
pub fn load_or_generate(dir: &Path) -> Result<(TicketSigner, bool), KeyError> {
    let path = dir.join(SEED_FILE);
    let shown = path.display().to_string();
    let io = |source| KeyError::Io {
        path: shown.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let seed = hex::decode::<32>(text.trim()).map_err(|_| KeyError::Malformed {
                path: shown.clone(),
            })?;
            Ok((TicketSigner::from_seed(seed), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            let mut seed = [0u8; 32];
            getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&path).map_err(io)?;
            file.write_all(format!("{}\n", hex::encode(&seed)).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io)?;
            Ok((TicketSigner::from_seed(seed), true))
        }
        Err(e) => Err(io(e)),
    }
}

/// The published form of a public key.
pub fn key_info(key: &ed25519_dalek::VerifyingKey) -> PublicKeyInfo {
    PublicKeyInfo {
        key_id: KeyId::of(key).to_string(),
        public_key: hex::encode(key.as_bytes()),
        algorithm: "ed25519".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reloaded() {
        let dir = std::env::temp_dir().join(format!("steelyard-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, fresh) = load_or_generate(&dir).unwrap();
        assert!(fresh);
        let (b, fresh) = load_or_generate(&dir).unwrap();
        assert!(!fresh);
        assert_eq!(a.public_key(), b.public_key());
        std::fs::write(dir.join(SEED_FILE), "garbage").unwrap();
        assert!(matches!(
            load_or_generate(&dir),
            Err(KeyError::Malformed { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
