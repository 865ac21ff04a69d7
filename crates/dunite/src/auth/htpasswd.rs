//! Users and their bcrypt password hashes, read from an htpasswd file (`htpasswd -B`).

use std::collections::HashMap;
use std::path::Path;

use super::AuthFileError;

/// A bcrypt hash of no password anyone knows: a user not in the file is checked against it,
/// so an unknown name costs the same time as a wrong password (no user enumeration by timing).
const DECOY: &str = "$2y$05$lfNTHFUVrVyeFEjW6WS.MOZko1pKFQK7fEx/alM4IcDTq0EijkrdK";

/// The users of an htpasswd file: name -> bcrypt hash.
#[derive(Debug, Clone, Default)]
pub(crate) struct Htpasswd {
    users: HashMap<String, String>,
}

impl Htpasswd {
    /// Read `path`: `user:hash` lines, `#` comments and blank lines ignored. Every hash must be
    /// bcrypt (`$2y$`, `$2b$` or `$2a$`, as `htpasswd -B` writes): the MD5, SHA-1 and crypt
    /// schemes htpasswd also knows are too weak to accept.
    ///
    /// # Errors
    ///
    /// [`AuthFileError`] naming the file and line.
    pub(crate) fn load(path: &Path) -> Result<Self, AuthFileError> {
        let mut users = HashMap::new();
        for (line, user, hash) in super::entries(path)? {
            let bad = |message: &str| AuthFileError::line(path, line, message);
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(bad("not a bcrypt hash (write entries with `htpasswd -B`)"));
            }
            if users.insert(user, hash).is_some() {
                return Err(bad("user listed twice"));
            }
        }
        Ok(Self { users })
    }

    /// Whether `password` is `user`'s. Slow on purpose (bcrypt): call it off the runtime's
    /// threads. An unknown user takes as long as a wrong password.
    pub(crate) fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, DECOY);
                false
            }
        }
    }

    /// How many users the file names.
    pub(crate) fn len(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `htpasswd -nbB alice secret-pass`, as Apache's tool wrote it.
    const ALICE: &str = "alice:$2y$05$REhSfycUQ4.X1f6OChDt/.axc..E8YRgOBBfTduMfGo6/4.6Di.VW";

    fn load(text: &str) -> Result<Htpasswd, AuthFileError> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        Htpasswd::load(file.path())
    }

    #[test]
    fn verifies_what_htpasswd_b_writes() {
        let users = load(&format!("# users\n\n{ALICE}\n")).unwrap();
        assert_eq!(users.len(), 1);
        assert!(users.verify("alice", "secret-pass"));
        assert!(!users.verify("alice", "secret-pas"));
        assert!(!users.verify("bob", "secret-pass"));
        assert!(DECOY.parse::<bcrypt::HashParts>().is_ok(), "the decoy must cost a real verification");
    }

    #[test]
    fn refuses_weak_schemes_and_names_the_line() {
        for weak in ["bob:$apr1$abc$def", "bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "bob:plain", "bob"] {
            let error = load(&format!("{ALICE}\n{weak}\n")).unwrap_err().to_string();
            assert!(error.contains("line 2"), "{weak}: {error}");
        }
        assert!(load(&format!("{ALICE}\n{ALICE}\n")).unwrap_err().to_string().contains("twice"));
    }
}
