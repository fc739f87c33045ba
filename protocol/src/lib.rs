//! veil agent API (skeleton).
