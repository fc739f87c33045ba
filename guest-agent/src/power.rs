//! Powering the VM off.
//!
//! The VMM runs the guest with "no reboot" semantics (QEMU `-no-reboot`) and the
//! kernel with `reboot=t panic=-1`, so a reboot request — or a kernel panic, such
//! as PID 1 exiting — ends the VM at once, without relying on ACPI.

use nix::sys::reboot::{reboot, RebootMode};

/// Syncs filesystems and ends the VM. Never returns when it works; as a
/// non-PID-1 process (host mode) it only logs, since the host must not go down.
pub fn power_off() {
    if !crate::init::is_pid1() {
        tracing::warn!("power off requested outside a VM: ignored");
        return;
    }
    tracing::debug!("powering off");
    // The console transmits asynchronously: let the last log lines out first.
    let _ = nix::sys::termios::tcdrain(std::io::stderr());
    nix::unistd::sync();
    // RB_AUTOBOOT: the VMM treats the resulting reset as the end of the VM.
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("veil-agent: reboot failed: {e}; exiting PID 1 to force a kernel panic");
    std::process::exit(1);
}
