//! Waiting for something that gives no signal when it happens (a device
//! node, a socket, a child's exit seen without reaping it): look, sleep a
//! little, look again, until a deadline. One loop for the host (`kiln`) and
//! the guest (`kiln-agent`), which both wait like this.

use std::time::{Duration, Instant};

/// Calls `f` until it returns `Some`, sleeping `every` between calls; `None`
/// once `deadline` has passed. `f` is always called at least once, and once
/// more after the last sleep, so what happened just before the deadline is
/// still seen.
pub fn poll_until<T>(
    deadline: Instant,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// [`poll_until`] for an `f` that can fail: its first error ends the wait.
pub fn try_poll_until<T, E>(
    deadline: Instant,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    poll_until(deadline, every, || f().transpose()).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(1);

    #[test]
    fn returns_the_first_value_found() {
        let mut calls = 0;
        let found = poll_until(Instant::now() + Duration::from_secs(10), TICK, || {
            calls += 1;
            (calls == 3).then_some(calls * 10)
        });
        assert_eq!(found, Some(30));
        assert_eq!(calls, 3);
    }

    #[test]
    fn gives_up_at_the_deadline_after_a_last_look() {
        let start = Instant::now();
        let mut calls = 0;
        let found: Option<()> = poll_until(start + Duration::from_millis(30), TICK, || {
            calls += 1;
            None
        });
        assert_eq!(found, None);
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(calls >= 2, "looked {calls} times");

        // A deadline already passed still gets one look.
        let mut calls = 0;
        let found = poll_until(start, Duration::from_secs(3600), || {
            calls += 1;
            Some(())
        });
        assert_eq!((found, calls), (Some(()), 1));
        let found: Option<()> = poll_until(start, Duration::from_secs(3600), || None);
        assert_eq!(found, None);
    }

    #[test]
    fn an_error_ends_the_wait() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut calls = 0;
        let r: Result<Option<()>, String> = try_poll_until(deadline, TICK, || {
            calls += 1;
            if calls == 2 {
                Err("broken".into())
            } else {
                Ok(None)
            }
        });
        assert_eq!(r, Err("broken".to_string()));
        assert_eq!(calls, 2);
        let r: Result<Option<u8>, String> = try_poll_until(deadline, TICK, || Ok(Some(7)));
        assert_eq!(r, Ok(Some(7)));
        let r: Result<Option<u8>, String> = try_poll_until(Instant::now(), TICK, || Ok(None));
        assert_eq!(r, Ok(None));
    }
}
