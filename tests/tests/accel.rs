//! `accel = "auto"` decides with a KVM canary. This checks the canary against
//! reality: the real kernel and agent are booted under KVM regardless, and the
//! canary must have predicted whether that boot works.

use std::time::{Duration, Instant};

use veil_shim::vmm::{accel, AccelChoice};
use veil_tests::{Artefacts, TestVm, VmOptions};

#[tokio::test]
async fn kvm_canary_predicts_whether_a_real_guest_boots_under_kvm() {
    let a = Artefacts::locate().unwrap();
    let canary = accel::kvm_canary(Duration::from_secs(5));

    let mut opts = VmOptions::agent(&a);
    opts.accel = AccelChoice::Kvm;
    let mut vm = TestVm::boot(&a, &opts).unwrap();
    // Under working KVM the agent is up in well under a second; a broken KVM
    // either kills QEMU ("KVM internal error") or leaves the guest stuck.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut booted = false;
    while Instant::now() < deadline {
        if vm.wait_ready(Duration::from_millis(500)).await.is_ok() {
            booted = true;
            break;
        }
        if vm.wait_exit(Duration::ZERO) {
            break; // QEMU gave up
        }
    }
    let console = vm.console();
    drop(vm);
    assert_eq!(
        canary.is_ok(),
        booted,
        "the canary said {canary:?}, but a real guest under KVM {} (console:\n{console})",
        if booted { "booted" } else { "did not boot" }
    );
}

#[test]
fn auto_resolves_to_what_the_canary_says() {
    let expected = match accel::kvm_canary(Duration::from_secs(5)) {
        Ok(()) => veil_shim::vmm::Accel::Kvm,
        Err(_) => veil_shim::vmm::Accel::Tcg,
    };
    assert_eq!(accel::resolve(AccelChoice::Auto), expected);
}
