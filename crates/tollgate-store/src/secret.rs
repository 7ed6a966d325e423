//! API key secrets: 256 random bits behind a `tg-` prefix, stored only as
//! their SHA-256 and compared in constant time.

use crate::Error;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The prefix every Tollgate key secret starts with.
pub const KEY_PREFIX: &str = "tg-";

/// A key secret in clear; shown once at creation, never logged.
pub struct SecretKey(String);

impl SecretKey {
    /// A fresh secret with 256 bits from the OS's random source.
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
        Ok(Self(format!("{KEY_PREFIX}{}", hex::encode(bytes))))
    }

    /// The secret itself, for the one time it is shown.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its hash, the only form that is stored.
    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }

    /// The first characters, safe to display (`tg-1a2b3c4d`).
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(KEY_PREFIX.len() + 8).collect()
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// SHA-256 of a key secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    /// Hashes a presented secret.
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// Constant-time equality, so a comparison leaks nothing through timing.
    pub fn ct_eq(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// Lowercase hex, as stored.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the stored hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretHash({}…)", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_prefixed_and_random() -> Result<(), Error> {
        let a = SecretKey::generate()?;
        let b = SecretKey::generate()?;
        assert!(a.expose().starts_with("tg-"));
        assert_eq!(a.expose().len(), 3 + 64);
        assert_ne!(a.expose(), b.expose());
        assert!(!format!("{a:?}").contains(&a.expose()[3..]));
        assert!(a.hash().ct_eq(&SecretHash::of(a.expose())));
        assert!(!a.hash().ct_eq(&b.hash()));
        assert_eq!(SecretHash::from_hex(&a.hash().to_hex()), Some(a.hash()));
        Ok(())
    }
}
