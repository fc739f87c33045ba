//! containerd-shim-veil-v2 library (skeleton).
