//! What a kiln could leave behind on the host, for the tests that check it
//! left nothing: processes, mounts and loop devices that mention a path.

use std::fs;
use std::time::{Duration, Instant};

use kiln_agent::poll::poll_until;

/// Live processes whose command line or environment (kiln's helpers
/// inherit its TMPDIR) mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").expect("proc").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // Another user's environment is unreadable; kiln runs as this one.
        let environ = fs::read(e.path().join("environ")).unwrap_or_default();
        if cmdline.contains(needle) || String::from_utf8_lossy(&environ).contains(needle) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// What [`processes_mentioning`] finds once those processes had up to
/// `grace` to end (a killed parent's helpers die with it, not at once).
#[allow(dead_code)] // Not every test crate that includes this uses it.
pub fn processes_left_after(needle: &str, grace: Duration) -> Vec<String> {
    poll_until(Instant::now() + grace, Duration::from_millis(50), || {
        processes_mentioning(needle).is_empty().then_some(())
    });
    processes_mentioning(needle)
}

/// Mounts (in this process's namespace) whose source or mount point
/// mentions `needle`, and loop devices whose backing file does.
#[allow(dead_code)] // Not every test crate that includes this uses it.
pub fn mounts_and_loop_devices_mentioning(needle: &str) -> Vec<String> {
    let mut found: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(needle))
        .map(|l| format!("mount: {l}"))
        .collect();
    for e in fs::read_dir("/sys/block").expect("/sys/block").flatten() {
        if let Ok(backing) = fs::read_to_string(e.path().join("loop/backing_file")) {
            if backing.contains(needle) {
                found.push(format!(
                    "{}: {}",
                    e.file_name().to_string_lossy(),
                    backing.trim()
                ));
            }
        }
    }
    found
}
