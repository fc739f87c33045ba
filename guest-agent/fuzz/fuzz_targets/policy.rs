//! The pod's request policy (init-data from the host): the parser, and the
//! evaluator on whatever parses — a policy document and an OCI spec cut from
//! the same input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_agent::policy::{eval::ContainerView, eval::ExecView, Policy};

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (doc, spec) = rest.split_at(n as usize * rest.len() / 256);
    let Ok(p) = Policy::parse(doc) else { return };
    if let Ok(s) = veil_agent::engine::plan::parse_spec(spec) {
        let v = ContainerView::of(&s, false, None);
        if let Ok(rule) = p.check_container(&v) {
            if let Some(proc_) = s.process() {
                let _ = p.check_exec(rule, &ExecView::of(proc_, false));
            }
        }
    }
    let _ = p.check_signal(spec.len() as u32);
});
