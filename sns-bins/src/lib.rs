//! Shared helpers for the binaries.
