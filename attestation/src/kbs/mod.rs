//! KBS (stub).
