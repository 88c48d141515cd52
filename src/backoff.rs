//! Restart delays for workers that keep failing: exponential, capped, forgiven after a good run.

use std::time::Duration;

use crate::config::BackoffPolicy;

/// Delay before restart number `failures` (1 = first failure in a row).
pub fn delay(policy: &BackoffPolicy, failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(30);
    policy.initial.saturating_mul(1u32 << shift).min(policy.max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let p = BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
        };
        let ms: Vec<u128> = (1..=12).map(|f| delay(&p, f).as_millis()).collect();
        assert_eq!(ms[..5], [100, 200, 400, 800, 1600]);
        assert_eq!(*ms.last().unwrap(), 30_000);
        assert_eq!(delay(&p, 1000), Duration::from_secs(30));
    }
}
