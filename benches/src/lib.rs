//! veil benchmarks (skeleton).
