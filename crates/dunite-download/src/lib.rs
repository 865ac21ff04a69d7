//! The download cache (skeleton; filled by its own issue).
