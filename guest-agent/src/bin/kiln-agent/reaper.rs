//! Orphan reaping as PID 1.
//!
//! Every orphan in the guest becomes our child, and zombies must be reaped.
//! Commands the agent starts are waited for by their own threads (through
//! `std::process::Child::wait`), so the reaper must never reap those: it peeks
//! at zombies with `WNOWAIT` and reaps only pids nobody tracks. Spawning
//! happens under [`spawn_guard`], so a child std is still setting up (or
//! reaping after a failed exec) is never mistaken for an orphan.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag};
use nix::unistd::Pid;

struct State {
    tracked: HashSet<i32>,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        Mutex::new(State {
            tracked: HashSet::new(),
        })
    })
}

fn lock() -> MutexGuard<'static, State> {
    // A poisoned lock only means another thread panicked while holding it;
    // the set itself is still consistent.
    state().lock().unwrap_or_else(|p| p.into_inner())
}

/// Held while spawning a child and registering it with [`SpawnGuard::track`].
pub struct SpawnGuard(MutexGuard<'static, State>);

impl SpawnGuard {
    pub fn track(&mut self, pid: u32) {
        self.0.tracked.insert(pid as i32);
    }
}

pub fn spawn_guard() -> SpawnGuard {
    SpawnGuard(lock())
}

/// Called by the owner after it has waited for its child.
pub fn untrack(pid: u32) {
    lock().tracked.remove(&(pid as i32));
}

pub fn start() {
    let _ = std::thread::Builder::new().name("reaper".into()).spawn(run);
}

fn run() {
    loop {
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(status) => {
                let Some(pid) = status.pid() else {
                    continue;
                };
                let guard = lock();
                if guard.tracked.contains(&pid.as_raw()) {
                    // Its owner is about to wait for it.
                    drop(guard);
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                let _ = waitpid(Pid::from_raw(pid.as_raw()), Some(WaitPidFlag::WNOHANG));
            }
            Err(Errno::EINTR) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
