//! Crash points: the one way a test stops a verlay process right after a named step.
//!
//! A multi-step operation calls `crash_point("STEP")` after each step it documents
//! (docs/ordering.md, docs/layer-format.md). A step is named `OPERATION.STEP`, the same
//! name the logs and the docs use: `copy_up.fsync`, `import.seal`, `commit.freeze`,
//! `gate.thaw`. Tests find the points by grepping for `crash_point("` in the source, so a
//! call keeps that spelling with the name as a string literal.
//!
//! With `VERLAY_CRASH_AT=STEP` in the environment, the process kills itself with SIGKILL
//! right after STEP completes for the first time; with `VERLAY_CRASH_AT=STEP:N`, the N-th
//! time (counting from 1, per process). SIGKILL means no cleanup and no destructors: what a
//! `kill -9` leaves (the page cache survives, so this models a crashed process, not a power
//! cut; `upper::sim` and the xfs power-cut tests model power loss).
//!
//! A program with steps of its own declares its own [`Failpoints`] with its own variable (the
//! snapshotter: `VERLAY_SNAPSHOTTER_CRASH_AT`), so that stopping it never arms the verlay
//! library code it runs in-process, and the reverse.
//!
//! Cost when no variable is set: one relaxed atomic load per call (the variable is read once,
//! at the first call).
//!
//! Must not: be used for anything but tests; change what a step does.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

use tracing::warn;

/// The environment variable naming verlay's crash point: `STEP` or `STEP:N`.
pub const CRASH_AT_ENV: &str = "VERLAY_CRASH_AT";

/// `state` before the variable was read.
const UNREAD: u8 = 0;
/// `state` when no crash point is armed: every call returns at once.
const OFF: u8 = 1;
/// `state` when a crash point is armed.
const ON: u8 = 2;

/// The crash points of one program, armed by one environment variable.
pub struct Failpoints {
    env: &'static str,
    state: AtomicU8,
    armed: OnceLock<Option<Armed>>,
}

/// The parsed variable: the step and which arrival at it kills.
struct Armed {
    step: String,
    nth: u64,
    reached: AtomicU64,
}

/// `STEP` or `STEP:N` (N from 1); anything else after the last `:` is part of the step.
fn parse(v: &str) -> Armed {
    let (step, nth) = match v.rsplit_once(':').map(|(s, n)| (s, n.parse::<u64>())) {
        Some((s, Ok(n))) => (s, n),
        _ => (v, 1),
    };
    Armed {
        step: step.to_string(),
        nth,
        reached: AtomicU64::new(0),
    }
}

impl Failpoints {
    /// Crash points armed by the environment variable `env`.
    pub const fn new(env: &'static str) -> Failpoints {
        Failpoints {
            env,
            state: AtomicU8::new(UNREAD),
            armed: OnceLock::new(),
        }
    }

    /// The step `step` has just completed: kill the process if the variable names it (and
    /// this is the N-th arrival).
    #[inline]
    pub fn crash_point(&self, step: &str) {
        if self.state.load(Ordering::Relaxed) == OFF {
            return;
        }
        self.armed_point(step);
    }

    #[cold]
    fn armed_point(&self, step: &str) {
        let armed = self
            .armed
            .get_or_init(|| std::env::var(self.env).ok().map(|v| parse(&v)));
        let Some(a) = armed else {
            self.state.store(OFF, Ordering::Relaxed);
            return;
        };
        self.state.store(ON, Ordering::Relaxed);
        if a.step != step || a.reached.fetch_add(1, Ordering::AcqRel) + 1 != a.nth {
            return;
        }
        warn!(step, env = self.env, "crash point reached: killing the process");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// verlay's crash points (upper, store, commit, control), armed by [`CRASH_AT_ENV`].
static VERLAY: Failpoints = Failpoints::new(CRASH_AT_ENV);

/// The step `step` of verlay has just completed; see the module doc.
#[inline]
pub fn crash_point(step: &str) {
    VERLAY.crash_point(step);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_and_count_parse() {
        for (v, step, nth) in [
            ("copy_up.fsync", "copy_up.fsync", 1),
            ("copy_up.fsync:3", "copy_up.fsync", 3),
            ("a:b", "a:b", 1),
            ("a:b:2", "a:b", 2),
        ] {
            let a = parse(v);
            assert_eq!((a.step.as_str(), a.nth), (step, nth), "{v}");
        }
    }

    #[test]
    fn unset_variable_turns_points_off() {
        static P: Failpoints = Failpoints::new("VERLAY_TEST_CRASH_AT_NEVER_SET");
        P.crash_point("x.y");
        assert_eq!(P.state.load(Ordering::Relaxed), OFF);
        P.crash_point("x.y");
    }
}
