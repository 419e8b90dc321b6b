//! One clock for every process of the machine (CLOCK_MONOTONIC), and when
//! this process was spawned by whoever timed it (`warmer bench`).

/// The environment variable through which the bench tells the `warmer run`
/// it spawns when it spawned it (CLOCK_MONOTONIC, ns).
pub const SPAWNED_AT: &str = "WARMER_SPAWNED_AT_NS";

/// CLOCK_MONOTONIC now, in ns (one clock for every process of the machine).
pub fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u128::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u128::try_from(ts.tv_nsec).unwrap_or(0)
}

/// In a `warmer run` the bench spawned: µs since that spawn.
pub fn since_spawn_us() -> Option<u64> {
    let at: u128 = std::env::var(SPAWNED_AT).ok()?.parse().ok()?;
    u64::try_from(monotonic_ns().checked_sub(at)? / 1000).ok()
}

/// `now + d`, saturating (a deadline a week or a century away is the same
/// to anything that waits for it); never panics on a huge `d`.
pub fn deadline(d: std::time::Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(std::time::Duration::from_secs(10 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_huge_deadline_saturates_instead_of_panicking() {
        let far = super::deadline(std::time::Duration::MAX);
        assert!(far > std::time::Instant::now());
    }
}
