//! Test-only crash points. `point("name")` sits at the boundaries between the steps of an
//! operation (after the image is made, after the loop attach, ...). It does nothing unless the
//! process was started with `BLOCKCSI_FAULT_POINTS` (a comma list of point names, or `*`) or
//! `BLOCKCSI_FAULT_RANDOM=<probability>` (seeded by `BLOCKCSI_FAULT_SEED`), and then it kills the
//! process with SIGKILL right there, as a power cut or the OOM killer would: no destructor, no
//! unwinding, no flush. The crash tests in `tests/crash.rs` use it to prove that every step
//! boundary is a safe place to die.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const POINTS_ENV: &str = "BLOCKCSI_FAULT_POINTS";
pub const RANDOM_ENV: &str = "BLOCKCSI_FAULT_RANDOM";
pub const SEED_ENV: &str = "BLOCKCSI_FAULT_SEED";

/// Every point the driver has, so a test can check it armed real names.
pub const ALL: &[&str] = &[
    "create.after_index",
    "create.after_image",
    "create.after_record",
    "delete.after_index",
    "delete.after_image",
    "attach.after_store",
    "detach.after_store",
    "stage.after_attach",
    "stage.after_mkfs",
    "stage.after_record_filesystem",
    "stage.after_mount",
    "publish.after_target",
    "publish.after_bind",
    "unstage.after_unmount",
    "unstage.after_detach",
    "unpublish.after_unmount",
];

#[derive(Debug, Default)]
struct Plan {
    named: Vec<String>,
    all: bool,
    /// Probability in parts per million, so the draw is integer arithmetic.
    random_ppm: u64,
}

impl Plan {
    fn from_env() -> Plan {
        Plan::parse(
            std::env::var(POINTS_ENV).ok().as_deref(),
            std::env::var(RANDOM_ENV).ok().as_deref(),
        )
    }

    fn parse(points: Option<&str>, random: Option<&str>) -> Plan {
        let mut plan = Plan::default();
        for name in points
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            if name == "*" {
                plan.all = true;
            } else {
                plan.named.push(name.to_string());
            }
        }
        if let Some(p) = random.and_then(|v| v.trim().parse::<f64>().ok()) {
            if p.is_finite() && p > 0.0 {
                plan.random_ppm = (p.min(1.0) * 1e6) as u64;
            }
        }
        plan
    }

    fn armed(&self) -> bool {
        self.all || !self.named.is_empty() || self.random_ppm > 0
    }
}

static PLAN: OnceLock<Plan> = OnceLock::new();
static RNG: AtomicU64 = AtomicU64::new(0);

fn plan() -> &'static Plan {
    PLAN.get_or_init(|| {
        let plan = Plan::from_env();
        let seed = std::env::var(SEED_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        // xorshift needs a non-zero state.
        RNG.store(seed | 1, Ordering::Relaxed);
        plan
    })
}

/// A draw in [0, 1_000_000). xorshift64*: reproducible from the seed, no dependency.
fn draw_ppm() -> u64 {
    let mut x = RNG.load(Ordering::Relaxed);
    loop {
        let mut next = x;
        next ^= next >> 12;
        next ^= next << 25;
        next ^= next >> 27;
        match RNG.compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next.wrapping_mul(0x2545_f491_4f6c_dd1d) % 1_000_000,
            Err(seen) => x = seen,
        }
    }
}

/// Whether the process should die at `name` under the configured plan.
fn should_die(name: &str) -> bool {
    let plan = plan();
    if !plan.armed() {
        return false;
    }
    plan.all || plan.named.iter().any(|n| n == name) || draw_ppm() < plan.random_ppm
}

/// A step boundary. Inert unless fault injection is configured; then it may SIGKILL the process.
#[inline]
pub fn point(name: &'static str) {
    if should_die(name) {
        // One line on stderr (unbuffered) so the test can tell which point fired.
        eprintln!("fault point {name}: SIGKILL");
        // SAFETY: getpid and kill have no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        // SIGKILL to oneself is delivered before kill returns; never go on past a fault point.
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_parses_names_wildcard_and_probability() {
        let parse = Plan::parse;
        assert!(!parse(None, None).armed());
        assert!(!parse(Some(" , "), Some("0")).armed());
        assert!(!parse(None, Some("NaN")).armed());
        let p = parse(Some("stage.after_attach, create.after_index"), None);
        assert_eq!(p.named, ["stage.after_attach", "create.after_index"]);
        assert!(parse(Some("*"), None).all);
        assert_eq!(parse(None, Some("0.25")).random_ppm, 250_000);
        assert_eq!(parse(None, Some("7")).random_ppm, 1_000_000);
    }

    #[test]
    fn draws_are_spread_over_the_range() {
        plan();
        let draws: Vec<u64> = (0..10_000).map(|_| draw_ppm()).collect();
        assert!(draws.iter().all(|&d| d < 1_000_000));
        let low = draws.iter().filter(|&&d| d < 500_000).count();
        assert!((4_000..6_000).contains(&low), "{low}");
    }

    #[test]
    fn points_are_inert_without_configuration() {
        // The unit-test process has no fault variables set: this must return.
        for name in ALL {
            point(name);
        }
    }
}
