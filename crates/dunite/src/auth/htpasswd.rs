//! Users and their bcrypt password hashes, read from an htpasswd file (`htpasswd -B`).

use std::collections::HashMap;
use std::path::Path;

use super::AuthFileError;

/// A bcrypt hash of no password anyone knows, of the lowest cost htpasswd writes (for an
/// empty file).
const DECOY: &str = "$2y$05$lfNTHFUVrVyeFEjW6WS.MOZko1pKFQK7fEx/alM4IcDTq0EijkrdK";

/// The users of an htpasswd file: name -> bcrypt hash.
#[derive(Debug, Clone, Default)]
pub(crate) struct Htpasswd {
    users: HashMap<String, String>,
    /// A user not in the file is checked against this hash of no known password, made at load
    /// with the highest cost in the file: an unknown name costs as much time as a known one
    /// with a wrong password (no user enumeration by timing, and no cheaper path to flood).
    decoy: Option<String>,
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
        let mut highest_cost = None;
        for (line, user, hash) in super::entries(path)? {
            let bad = |message: &str| AuthFileError::line(path, line, message);
            let Ok(parts) = hash.parse::<bcrypt::HashParts>() else {
                return Err(bad("not a bcrypt hash (write entries with `htpasswd -B`)"));
            };
            highest_cost = highest_cost.max(Some(parts.get_cost()));
            if users.insert(user, hash).is_some() {
                return Err(bad("user listed twice"));
            }
        }
        // What the decoy hashes does not matter: an unknown user is refused whatever matches.
        let decoy = highest_cost.and_then(|cost| bcrypt::hash("decoy", cost).ok());
        Ok(Self { users, decoy })
    }

    /// Whether `password` is `user`'s. Slow on purpose (bcrypt): call it off the runtime's
    /// threads. An unknown user takes as long as a wrong password.
    pub(crate) fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, self.decoy.as_deref().unwrap_or(DECOY));
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
        let decoy = users.decoy.as_deref().unwrap().parse::<bcrypt::HashParts>().unwrap();
        assert_eq!(decoy.get_cost(), 5, "the decoy costs what the file's dearest entry costs");
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
