//! What the timing benchmarks print: the median of a set of runs, with its
//! range.

use std::time::Duration;

/// The median of `v` (sorted in place); `v` must not be empty.
pub fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

/// Prints "LABEL median X s (min Y, max Z)" for the runs in `v` and returns
/// the median.
pub fn report(label: &str, v: &mut [Duration]) -> Duration {
    let m = median(v);
    println!(
        "{label} median {:.3} s (min {:.3}, max {:.3})",
        m.as_secs_f64(),
        v[0].as_secs_f64(),
        v[v.len() - 1].as_secs_f64()
    );
    m
}
