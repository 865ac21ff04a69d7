//! Cross-crate and end-to-end tests of dunite live in `tests/`; this library is empty.
