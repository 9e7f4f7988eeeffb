//! A small, dependency-free fuzzing harness (no nightly needed): a seeded
//! PRNG, byte mutations, a per-thread largest-allocation tracker and a
//! runner that feeds generated inputs to a [`Target`] under `catch_unwind`.
//!
//! Used by the short CI tests (`tests/fuzz_frames.rs` here, lohar's
//! `tests/fuzz_requests.rs`) and the long run (`bench` `fuzz-bench`, 10 M
//! inputs per target). A panic in a target, or an invariant it asserts, is
//! a crash; the runner keeps the input's hex as a reproducer.

pub mod alloc;
pub mod frames;
pub mod gen;
pub mod guest_config;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

pub use gen::Rng;

/// Something to fuzz: makes inputs and runs one.
pub trait Target {
    fn name(&self) -> &'static str;
    /// One input, structure-aware (valid shapes with bad values) or not.
    fn generate(&mut self, rng: &mut Rng) -> Vec<u8>;
    /// Runs one input; panics on a bug (its own asserts included).
    fn run(&mut self, input: &[u8]);
    /// Largest single allocation `input` may cause (checked when the
    /// [`alloc::Tracker`] is the global allocator).
    fn alloc_limit(&self, input: &[u8]) -> usize;
}

/// One crashing input.
#[derive(Debug, Clone)]
pub struct Crash {
    pub index: u64,
    pub message: String,
    pub input_hex: String,
}

/// The result of [`run`].
#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub inputs: u64,
    pub crashes: u64,
    /// The first crashes (at most 10), with reproducers.
    pub examples: Vec<Crash>,
    /// Largest single allocation seen during any input (0 without the
    /// tracker installed).
    pub max_alloc: usize,
    pub elapsed: Duration,
}

impl Report {
    pub fn per_sec(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Prints the totals and each kept crash with its reproducer.
    pub fn print(&self) {
        eprintln!(
            "{}: {} inputs, {} crashes, {:.0}/s, largest allocation {} B",
            self.target,
            self.inputs,
            self.crashes,
            self.per_sec(),
            self.max_alloc
        );
        for c in &self.examples {
            eprintln!(
                "  input #{}: {}\n    hex {}",
                c.index, c.message, c.input_hex
            );
        }
    }
}

/// The seed of input `index`: every input is reproducible on its own.
pub fn input_seed(seed: u64, index: u64) -> u64 {
    seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Runs `inputs` generated inputs through `target`.
pub fn run(target: &mut dyn Target, inputs: u64, seed: u64) -> Report {
    let quiet = QuietPanics::install();
    let start = Instant::now();
    let mut report = Report {
        target: target.name(),
        inputs: 0,
        crashes: 0,
        examples: Vec::new(),
        max_alloc: 0,
        elapsed: Duration::ZERO,
    };
    for index in 0..inputs {
        let mut rng = Rng::new(input_seed(seed, index));
        let input = target.generate(&mut rng);
        let limit = target.alloc_limit(&input);
        alloc::reset();
        let result = catch_unwind(AssertUnwindSafe(|| target.run(&input)));
        let largest = alloc::largest();
        report.max_alloc = report.max_alloc.max(largest);
        let failure = match result {
            Err(_) => Some(quiet.take_message()),
            Ok(()) if largest > limit => Some(format!(
                "allocated {largest} bytes at once (limit {limit} for this input)"
            )),
            Ok(()) => None,
        };
        report.inputs += 1;
        if let Some(message) = failure {
            report.crashes += 1;
            if report.examples.len() < 10 {
                report.examples.push(Crash {
                    index,
                    message,
                    input_hex: gen::hex(&input),
                });
            }
        }
    }
    report.elapsed = start.elapsed();
    report
}

/// Runs one input (e.g. a reproducer's hex) and returns the panic message.
pub fn run_one(target: &mut dyn Target, input: &[u8]) -> Result<(), String> {
    let quiet = QuietPanics::install();
    catch_unwind(AssertUnwindSafe(|| target.run(input))).map_err(|_| quiet.take_message())
}

std::thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Replaces the panic hook while fuzzing: messages are kept for the report
/// instead of printing millions of lines. Restores the default on drop.
struct QuietPanics;

impl QuietPanics {
    fn install() -> QuietPanics {
        std::panic::set_hook(Box::new(|info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = format!("{msg}{at}"));
        }));
        QuietPanics
    }

    fn take_message(&self) -> String {
        LAST_PANIC.with(|p| std::mem::take(&mut *p.borrow_mut()))
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        let _ = std::panic::take_hook();
    }
}
