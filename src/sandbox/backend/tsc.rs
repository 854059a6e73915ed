//! The host's TSC frequency, for guests under TCG.
//!
//! Under TCG a guest's RDTSC returns the host's TSC, but the guest has no
//! way to learn its rate: no kvmclock, and on `-M microvm` without ACPI no
//! HPET or PM timer, so Linux calibrates against the emulated PIT. On a busy
//! host (two TCG guests on two cores are enough) that calibration fails,
//! Linux marks the TSC unstable and falls back to a 10 ms jiffies clock: time
//! in the guest gets coarse, and a KVM inside it cannot give its own guests a
//! stable kvmclock, so they hang in early boot. Passing the rate measured
//! here as `tsc_early_khz=` skips the calibration.

use std::time::Duration;

/// How long to count TSC ticks against the host's clock. The error is the
/// two brackets' widths (a few µs) over this.
const WINDOW: Duration = Duration::from_millis(10);
/// A (clock, TSC, clock) bracket wider than this was interrupted; retry.
const TIGHT_NS: u64 = 5_000;
const TRIES: usize = 200;

/// The host's TSC rate in kHz, when the TSC is invariant (its rate does not
/// follow CPU frequency or sleep states) and measures as a plausible rate.
pub fn host_tsc_khz() -> Option<u32> {
    if !invariant_tsc() {
        return None;
    }
    let (ns0, tsc0) = sample()?;
    std::thread::sleep(WINDOW);
    let (ns1, tsc1) = sample()?;
    khz_from(ns1.checked_sub(ns0)?, tsc1.checked_sub(tsc0)?)
}

/// kHz from ticks counted over nanoseconds, if in a plausible range for a
/// TSC (100 MHz to 10 GHz).
fn khz_from(ns: u64, ticks: u64) -> Option<u32> {
    if ns == 0 {
        return None;
    }
    let khz = (u128::from(ticks) * 1_000_000 + u128::from(ns) / 2) / u128::from(ns);
    let khz = u32::try_from(khz).ok()?;
    (100_000..=10_000_000).contains(&khz).then_some(khz)
}

/// CPUID 0x8000_0007 EDX bit 8: the TSC runs at a constant rate in all
/// P-, C- and T-states.
// `__cpuid` is a safe function in newer Rust and unsafe in our MSRV's.
#[allow(unused_unsafe)]
fn invariant_tsc() -> bool {
    use std::arch::x86_64::__cpuid;
    // SAFETY: CPUID is available on every x86-64 CPU; asking for a leaf
    // above the maximum returns data, never faults.
    let max = unsafe { __cpuid(0x8000_0000) }.eax;
    if max < 0x8000_0007 {
        return false;
    }
    // SAFETY: as above.
    let edx = unsafe { __cpuid(0x8000_0007) }.edx;
    edx & (1 << 8) != 0
}

/// A TSC reading with the monotonic clock's time at that moment (in ns),
/// from the tightest of several brackets.
fn sample() -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64, u64)> = None; // (width, ns, tsc)
    for _ in 0..TRIES {
        let before = monotonic_raw_ns()?;
        // SAFETY: RDTSC reads a counter; it has no memory effects.
        let tsc = unsafe { std::arch::x86_64::_rdtsc() };
        let after = monotonic_raw_ns()?;
        let width = after.saturating_sub(before);
        if best.map_or(true, |(w, _, _)| width < w) {
            best = Some((width, before + width / 2, tsc));
        }
        if width <= TIGHT_NS {
            break;
        }
    }
    best.map(|(_, ns, tsc)| (ns, tsc))
}

/// CLOCK_MONOTONIC_RAW in ns: not slewed by NTP, as the TSC is not.
fn monotonic_raw_ns() -> Option<u64> {
    // The fallible call: `clock_gettime` panics where the clock is refused
    // (a seccomp sandbox), and without the reading kiln just goes on
    // without tsc_early_khz.
    let ts = rustix::time::clock_gettime_dynamic(rustix::time::DynamicClockId::Known(
        rustix::time::ClockId::MonotonicRaw,
    ))
    .ok()?;
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn khz_is_ticks_per_millisecond_rounded() {
        assert_eq!(khz_from(10_000_000, 21_000_000), Some(2_100_000));
        assert_eq!(khz_from(1_000_000_000, 2_100_000_600), Some(2_100_001));
        assert_eq!(khz_from(1_000_000, 2_999_999_500), None, "3 THz");
        assert_eq!(khz_from(1_000_000, 50_000), None, "50 MHz");
        assert_eq!(khz_from(0, 5), None);
    }

    #[test]
    fn two_measurements_agree() {
        // Where the TSC is invariant (nearly every x86-64 host), two
        // measurements agree to 1%; elsewhere there is nothing to pass.
        let (Some(a), Some(b)) = (host_tsc_khz(), host_tsc_khz()) else {
            assert!(!invariant_tsc(), "an invariant TSC measured as implausible");
            return;
        };
        let diff = a.abs_diff(b);
        assert!(diff * 100 <= a, "{a} kHz then {b} kHz");
    }
}
