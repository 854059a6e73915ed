//! What the build benchmarks share: runs of `kiln build --json`, and
//! medians of seconds.
#![allow(dead_code)] // each bench takes the part it needs

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Ends the bench with `msg`.
pub fn fail(msg: &str) -> ! {
    eprintln!("build bench: {msg}");
    std::process::exit(1);
}

/// Builds `recipe` into `out` (emptied first) with `extra` flags: its wall
/// time and its `--json` report.
pub fn kiln_build(recipe: &Path, out: &Path, extra: &[&str]) -> (Duration, serde_json::Value) {
    let _ = std::fs::remove_dir_all(out);
    let started = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("build")
        .arg(recipe)
        .arg("-o")
        .arg(out)
        .arg("--json")
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| fail(&format!("kiln: {e}")));
    let took = started.elapsed();
    if !o.status.success() {
        fail(&format!("kiln build {} failed", recipe.display()));
    }
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| fail(&format!("json: {e}")));
    (took, v)
}
