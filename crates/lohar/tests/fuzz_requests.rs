//! Short fuzz run of the agent's request handling (CI form; the long form
//! is `fuzz-bench` in bench/). A failure prints the input's hex, which
//! `BHATTI_FUZZ_REPRO=<hex>` replays alone.

use bhatti_protocol::fuzz::{self, alloc::Tracker};
use lohar::fuzz::Requests;

#[global_allocator]
static ALLOC: Tracker = Tracker;

#[test]
fn requests_never_crash() {
    let mut target = Requests::new().expect("scratch dir");
    if let Some(hex) = std::env::var("BHATTI_FUZZ_REPRO")
        .ok()
        .filter(|h| !h.is_empty())
    {
        let input = fuzz::gen::unhex(&hex).expect("BHATTI_FUZZ_REPRO is hex");
        if let Err(msg) = fuzz::run_one(&mut target, &input) {
            panic!("requests: {msg}");
        }
        return;
    }
    let inputs = std::env::var("BHATTI_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let report = fuzz::run(&mut target, inputs, 0x5eed);
    report.print();
    assert_eq!(report.crashes, 0, "requests crashed");
}
