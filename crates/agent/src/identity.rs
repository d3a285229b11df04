//! The agent's identity: one Ed25519 key on disk, and the Noise (X25519) static keys derived
//! from it.
//!
//! The broker records each agent's Ed25519 public key at enrollment and hands it to the other
//! side of every session (`ConnectAnswer::peer_key`, `Offer::peer_key`). Both agents turn
//! that Ed25519 key into an X25519 key with the standard birational map
//! ([`VerifyingKey::to_montgomery`]); the private half is [`SigningKey::to_scalar_bytes`]. So
//! the Noise KK handshake authenticates exactly the keys the broker vouches for, and no second
//! key needs registering.
//!
//! What this module does not do: rotate keys, or protect the key file beyond creating it with
//! mode 0600 (the operator owns the directory).

use std::io::Write as _;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::tunnel::{StaticKeypair, KEY_LEN};

/// Loading, creating or converting an identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file could not be read or written.
    #[error("identity key file {path}: {source}; check the path and its permissions")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file does not hold 64 hex digits.
    #[error("identity key file {path} does not hold a key (64 hex digits); delete it to create a new identity, then re-enroll the peer")]
    Malformed {
        /// The file.
        path: String,
    },
    /// A peer key from the broker is not a valid Ed25519 public key.
    #[error("the broker gave a peer key that is not a valid Ed25519 key ({0}); the broker may predate peer keys — upgrade it")]
    BadPeerKey(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads the secret key at `path`, or creates a new random one there (mode 0600) when the file
/// does not exist. The file holds the 32-byte secret as 64 hex digits.
pub fn load_or_create(path: &Path) -> Result<SigningKey, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = steelyard_proto::hex::decode::<32>(text.trim()).map_err(|_| {
                IdentityError::Malformed {
                    path: path.display().to_string(),
                }
            })?;
            Ok(SigningKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::getrandom(&mut secret).map_err(|e| IdentityError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io_err(path))?;
            }
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                options.mode(0o600);
            }
            let mut file = options.open(path).map_err(io_err(path))?;
            file.write_all(format!("{}\n", steelyard_proto::hex::encode(&secret)).as_bytes())
                .map_err(io_err(path))?;
            Ok(SigningKey::from_bytes(&secret))
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// This agent's Noise static key pair, derived from its Ed25519 identity.
pub fn noise_keypair(key: &SigningKey) -> StaticKeypair {
    StaticKeypair {
        private: key.to_scalar_bytes(),
        public: key.verifying_key().to_montgomery().to_bytes(),
    }
}

/// The Noise static public key of a peer whose Ed25519 public key is `hex_key`.
pub fn noise_public(hex_key: &str) -> Result<[u8; KEY_LEN], IdentityError> {
    let key: VerifyingKey = steelyard_proto::api::parse_public_key(hex_key)
        .map_err(|e| IdentityError::BadPeerKey(e.message))?;
    Ok(key.to_montgomery().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_agree_and_file_is_private() {
        let dir = std::env::temp_dir().join(format!("steelyard-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("id.key");
        let k = load_or_create(&path).unwrap();
        assert_eq!(load_or_create(&path).unwrap().to_bytes(), k.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let pair = noise_keypair(&k);
        let hex = steelyard_proto::api::public_key_hex(&k.verifying_key());
        assert_eq!(noise_public(&hex).unwrap(), pair.public);
        assert!(noise_public("zz").is_err());
        std::fs::write(&path, "nope").unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(IdentityError::Malformed { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn noise_kk_works_with_keys_derived_from_ed25519() {
        use crate::tunnel::{Role, Tunnel, TunnelConfig};
        let (a, b) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let hex = |k: &SigningKey| steelyard_proto::api::public_key_hex(&k.verifying_key());
        let cfg = |role, me: &SigningKey, other: &SigningKey| TunnelConfig {
            role,
            local: noise_keypair(me),
            remote_public: noise_public(&hex(other)).unwrap(),
            binding: b"s".to_vec(),
            handshake_timeout: std::time::Duration::from_secs(5),
        };
        let (x, y) = tokio::io::duplex(4096);
        let (ca, cb) = (cfg(Role::Initiator, &a, &b), cfg(Role::Responder, &b, &a));
        let (ta, tb) = tokio::join!(Tunnel::handshake(x, &ca), Tunnel::handshake(y, &cb));
        let (ta, tb) = (ta.unwrap(), tb.unwrap());
        assert_eq!(ta.remote_static(), noise_keypair(&b).public);
        assert_eq!(tb.remote_static(), noise_keypair(&a).public);
        // A third key is refused.
        let c = SigningKey::from_bytes(&[3; 32]);
        let (x, y) = tokio::io::duplex(4096);
        let (ca, cb) = (cfg(Role::Initiator, &c, &b), cfg(Role::Responder, &b, &a));
        let (ta, tb) = tokio::join!(Tunnel::handshake(x, &ca), Tunnel::handshake(y, &cb));
        assert!(ta.is_err() || tb.is_err());
    }
}
