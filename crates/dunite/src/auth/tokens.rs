//! Static bearer tokens, read from a token file (`--client-token-file`).

use std::collections::HashMap;
use std::path::Path;

use sha2::Digest as _;

use super::AuthFileError;

/// The shortest token accepted: a token is a password nobody types, so it can be long.
const MIN_TOKEN_LEN: usize = 16;

/// Static tokens: the SHA-256 of each token -> the name it authenticates as. Only digests are
/// kept, and a presented token is looked up by its digest, so comparing never depends on how
/// many leading bytes of a secret match.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tokens {
    names: HashMap<[u8; 32], String>,
}

impl Tokens {
    /// Read `path`: `name:token` lines, `#` comments and blank lines ignored; tokens of at
    /// least 16 characters, each used once.
    ///
    /// # Errors
    ///
    /// [`AuthFileError`] naming the file and line (never the token).
    pub(crate) fn load(path: &Path) -> Result<Self, AuthFileError> {
        let mut names = HashMap::new();
        for (line, name, token) in super::entries(path)? {
            let bad = |message: &str| AuthFileError::line(path, line, message);
            if token.len() < MIN_TOKEN_LEN {
                return Err(bad("token shorter than 16 characters"));
            }
            if names.insert(digest(&token), name).is_some() {
                return Err(bad("token listed twice"));
            }
        }
        Ok(Self { names })
    }

    /// The name `token` authenticates as, if any.
    pub(crate) fn name(&self, token: &str) -> Option<&str> {
        self.names.get(&digest(token)).map(String::as_str)
    }

    /// How many tokens the file holds.
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }
}

fn digest(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_holder_and_short_ones_are_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "# ci runners\nci:0123456789abcdef-ci\nprometheus:fedcba9876543210\n")
            .unwrap();
        let tokens = Tokens::load(file.path()).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens.name("0123456789abcdef-ci"), Some("ci"));
        assert_eq!(tokens.name("fedcba9876543210"), Some("prometheus"));
        assert_eq!(tokens.name("0123456789abcdef"), None);
        std::fs::write(file.path(), "ci:short-secret\n").unwrap();
        let error = Tokens::load(file.path()).unwrap_err().to_string();
        assert!(error.contains("line 1") && !error.contains("short-secret"), "{error}");
    }
}
