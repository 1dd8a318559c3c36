//! The cluster token: the one secret that internal calls (heartbeats, mirroring, the log and
//! sync services, admin calls) carry when a deployment has one.
//!
//! Invariant: every process checks a presented token through [`check_token`], which compares in
//! time independent of where the first difference is.

use crate::error::{Error, Result};

/// Whether `presented` matches the `expected` cluster token: always when none is expected
/// (an open deployment), otherwise only the same token.
pub(crate) fn check_token(expected: Option<&str>, presented: Option<&str>) -> Result<()> {
    let Some(expected) = expected else {
        return Ok(());
    };
    match presented {
        Some(presented) if same(expected.as_bytes(), presented.as_bytes()) => Ok(()),
        _ => Err(Error::Unauthorized),
    }
}

/// Byte equality that looks at every byte, so the time taken does not say how much matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_token_passes_when_one_is_expected() {
        let expected = Some("s3cret-token-of-16");
        assert!(check_token(expected, Some("s3cret-token-of-16")).is_ok());
        for wrong in [
            None,
            Some(""),
            Some("s3cret-token-of-1"),
            Some("s3cret-token-of-17"),
        ] {
            assert!(
                matches!(check_token(expected, wrong), Err(Error::Unauthorized)),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn an_open_deployment_takes_any_call() {
        assert!(check_token(None, None).is_ok());
        assert!(check_token(None, Some("anything")).is_ok());
    }
}
