//! containerd-shim-veil-v2: the host side of a veil pod.
//!
//! containerd runs one shim per pod; the shim boots the pod's microVM and relays
//! the containerd task API to the agent inside it. Module map: [`vmm`] (the VMM
//! backend and accelerator choice), [`vsock`] (reaching the agent), [`process`]
//! (child processes the shim owns).

pub mod process;
pub mod vmm;
pub mod vsock;

/// Formats an error with all its sources, outermost first.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
