//! veil attestation: evidence, verification, reference values and the key broker (skeleton).
