//! The OCI blob cache (skeleton; filled by its own issue).
