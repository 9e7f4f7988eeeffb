//! Short fuzz runs of the protocol's decoders (CI form; the long form is
//! `fuzz-bench` in bench/). Inputs are seeded: a failure prints the input's
//! hex, which `BHATTI_FUZZ_REPRO=<hex>` replays alone.

use bhatti_protocol::fuzz::{self, alloc::Tracker, Target};

#[global_allocator]
static ALLOC: Tracker = Tracker;

/// Inputs per target; `BHATTI_FUZZ_INPUTS` overrides.
fn inputs() -> u64 {
    std::env::var("BHATTI_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn check(target: &mut dyn Target) {
    if let Some(hex) = std::env::var("BHATTI_FUZZ_REPRO")
        .ok()
        .filter(|h| !h.is_empty())
    {
        let input = fuzz::gen::unhex(&hex).expect("BHATTI_FUZZ_REPRO is hex");
        if let Err(msg) = fuzz::run_one(target, &input) {
            panic!("{}: {msg}", target.name());
        }
        return;
    }
    let report = fuzz::run(target, inputs(), 0x5eed);
    report.print();
    assert_eq!(report.crashes, 0, "{} crashed", report.target);
    assert!(report.max_alloc > 0, "the allocation tracker is installed");
}

#[test]
fn frames_never_crash() {
    check(&mut fuzz::frames::Frames::default());
}

#[test]
fn guest_configs_never_crash() {
    check(&mut fuzz::guest_config::GuestConfigs);
}

/// The harness itself: a target that panics is reported, with its input.
#[test]
fn a_panicking_target_is_a_crash() {
    struct Bad;
    impl Target for Bad {
        fn name(&self) -> &'static str {
            "bad"
        }
        fn generate(&mut self, rng: &mut fuzz::Rng) -> Vec<u8> {
            vec![rng.next_u64() as u8]
        }
        fn run(&mut self, input: &[u8]) {
            assert!(input[0].is_multiple_of(2), "odd byte");
        }
        fn alloc_limit(&self, _: &[u8]) -> usize {
            usize::MAX
        }
    }
    let report = fuzz::run(&mut Bad, 1000, 1);
    assert!(report.crashes > 300 && report.crashes < 700, "{report:?}");
    let c = &report.examples[0];
    assert!(c.message.contains("odd byte"), "{}", c.message);
    let input = fuzz::gen::unhex(&c.input_hex).unwrap();
    assert!(fuzz::run_one(&mut Bad, &input).is_err());
}
