//! What the offline check found, and what it repaired.

use std::fmt;

/// One disagreement [`EntryStore::check`](crate::EntryStore::check) found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// A live row whose payload file is missing.
    MissingFile {
        /// The row's key.
        key: String,
        /// The payload it names.
        file: String,
    },
    /// A payload whose size is not the row's.
    WrongSize {
        /// The row's key.
        key: String,
        /// What the row says.
        row: u64,
        /// What the file holds.
        file: u64,
    },
    /// A payload that does not hash to what its row says.
    WrongDigest {
        /// The row's key.
        key: String,
        /// What the row says.
        expected: String,
        /// What the payload hashes to.
        actual: String,
    },
    /// A file under `data/` no row names.
    OrphanFile {
        /// The file, relative to `data/`.
        file: String,
        /// Its size.
        size: u64,
    },
    /// A file left in `tmp/` (an interrupted store or fill).
    TempFile {
        /// The file's name.
        file: String,
    },
    /// A row marked for removal whose removal did not finish.
    UnfinishedRemoval {
        /// The row's key.
        key: String,
    },
    /// The accounted total disagrees with the rows.
    WrongTotal {
        /// Bytes and entries the total says.
        accounted: (u64, u64),
        /// Bytes and entries the rows add up to.
        rows: (u64, u64),
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingFile { key, file } => write!(f, "{key}: payload {file} is missing"),
            Self::WrongSize { key, row, file } => {
                write!(f, "{key}: payload holds {file} bytes, row says {row}")
            }
            Self::WrongDigest { key, expected, actual } => {
                write!(f, "{key}: payload hashes to {actual}, row says {expected}")
            }
            Self::OrphanFile { file, size } => write!(f, "data/{file}: {size} bytes no row names"),
            Self::TempFile { file } => write!(f, "tmp/{file}: left over"),
            Self::UnfinishedRemoval { key } => write!(f, "{key}: removal not finished"),
            Self::WrongTotal { accounted, rows } => write!(
                f,
                "accounted total {} bytes in {} entries, rows hold {} bytes in {} entries",
                accounted.0, accounted.1, rows.0, rows.1
            ),
        }
    }
}

/// A [`Problem`] and whether the check repaired it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Finding {
    /// What was wrong.
    pub problem: Problem,
    /// Whether it was fixed.
    pub repaired: bool,
}

/// What [`EntryStore::check`](crate::EntryStore::check) found (and did).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// The cache's namespace.
    pub namespace: String,
    /// Live rows.
    pub rows: u64,
    /// Their bytes.
    pub row_bytes: u64,
    /// Files under `data/`.
    pub files: u64,
    /// Payloads hashed and found right.
    pub verified: u64,
    /// Every disagreement, in the order found.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// Whether nothing is wrong, or everything wrong was repaired.
    #[must_use]
    pub fn is_consistent(&self) -> bool {
        self.findings.iter().all(|f| f.repaired)
    }
}
