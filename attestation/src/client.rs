//! client (stub).
