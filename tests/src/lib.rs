//! Shared test support for veil end-to-end tests (skeleton).
