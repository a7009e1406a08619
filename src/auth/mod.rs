//! Who may call the api: today a static admin secret (`auth.password`) presented as
//! `Authorization: Bearer <secret>`; tokens with roles and scopes build on this seam.
//!
//! Decides only; `http/` turns a refusal into a 401 and RESP into `-NOAUTH`.

use crate::config::Config;

/// The credentials keel accepts. Cheap to clone.
#[derive(Clone, Default)]
pub struct Authenticator {
    /// SHA-256 of the admin secret. Comparing digests keeps the comparison's timing
    /// independent of how much of a guess matched.
    admin_digest: Option<[u8; 32]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send Authorization: Bearer <token>")]
    Missing,
    #[error("the credentials are not valid")]
    Invalid,
}

impl Authenticator {
    /// On when `auth.enabled` is true, or unset with a password configured. Validation
    /// has already refused listeners beyond loopback without one.
    pub fn from_config(config: &Config) -> Authenticator {
        let secret = config
            .auth
            .password
            .as_ref()
            .filter(|secret| !secret.expose().is_empty());
        let enabled = config.auth.enabled.unwrap_or(secret.is_some());
        Authenticator {
            admin_digest: secret
                .filter(|_| enabled)
                .map(|secret| digest(secret.expose().as_bytes())),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.admin_digest.is_some()
    }

    /// Checks a presented secret (the Bearer token, or RESP `AUTH`'s argument).
    pub fn check(&self, presented: Option<&[u8]>) -> Result<(), AuthError> {
        let Some(expected) = &self.admin_digest else {
            return Ok(());
        };
        match presented {
            None => Err(AuthError::Missing),
            Some(secret) if digest(secret) == *expected => Ok(()),
            Some(_) => Err(AuthError::Invalid),
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn password_is_required_once_configured() {
        let mut config = Config::default();
        assert!(!Authenticator::from_config(&config).is_enabled());
        config.auth.password = Some(Secret("s3cret".into()));
        let auth = Authenticator::from_config(&config);
        assert_eq!(auth.check(None), Err(AuthError::Missing));
        assert_eq!(auth.check(Some(b"guess")), Err(AuthError::Invalid));
        assert_eq!(auth.check(Some(b"s3cret")), Ok(()));
        config.auth.enabled = Some(false);
        assert!(!Authenticator::from_config(&config).is_enabled());
    }
}
