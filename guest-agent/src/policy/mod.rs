//! The pod's request policy: the document and its evaluator live in
//! `veil-policy` (shared with the `veil policy` commands); [`gate`] is the
//! agent's side — delivery, the binding to the launch's host data, and the
//! per-request checks.

pub use veil_policy::*;

pub mod gate;

#[cfg(test)]
mod tests;
