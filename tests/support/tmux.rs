//! A tmux harness for tests that type at kiln on a real terminal, as a
//! person would (`tests/run.rs`, `tests/build.rs`).
#![allow(dead_code)] // each user takes the part it needs

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::poll::poll_until;

/// Whether tmux is installed; a test without it says it is skipped.
pub fn available() -> bool {
    if Command::new("tmux").arg("-V").output().is_ok() {
        return true;
    }
    eprintln!("SKIPPED: tmux is not installed (.ci/setup installs it)");
    false
}

/// A tmux server of the test's own (a private socket), killed with
/// everything in it when the test ends, passed or failed.
pub struct Tmux {
    socket: String,
    pub session: &'static str,
    /// Where the session's exit status file goes.
    dir: PathBuf,
    /// The server's pid, waited for on drop: `kill-server` returns before
    /// the server has gone, and a test checking right after that nothing
    /// mentions its directory would find the server's argv.
    server: Option<u32>,
}

/// In the message of a wait for the screen that timed out.
pub const SCREEN_TIMEOUT: &str = "on the screen within";

/// The environment variable naming the file the session's program's exit
/// status is written to.
const EXIT_ENV: &str = "KILN_TEST_EXIT";

impl Tmux {
    /// Starts a server with one session running `argv` (no shell between)
    /// in `cwd`, in a `cols` x `rows` window that is all pane (no status
    /// line); the pane stays, its screen readable, after `argv` ends.
    /// `dir` takes the server's config file.
    pub fn start(
        dir: &Path,
        session: &'static str,
        (cols, rows): (u16, u16),
        cwd: &Path,
        argv: &[&str],
    ) -> Tmux {
        let config = dir.join("tmux.conf");
        fs::write(&config, "set -g status off\nset -g remain-on-exit on\n")
            .expect("write tmux.conf");
        let mut tmux = Tmux {
            // Unique per test process and session, so tests may run in
            // parallel.
            socket: format!("kiln-test-{}-{session}", std::process::id()),
            session,
            dir: dir.to_path_buf(),
            server: None,
        };
        let config = config.to_string_lossy().into_owned();
        let cwd = cwd.to_string_lossy().into_owned();
        let exit_env = format!("{EXIT_ENV}={}", tmux.exit_file().display());
        let (cols, rows) = (cols.to_string(), rows.to_string());
        let mut args = vec![
            "-f",
            &config,
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            &cols,
            "-y",
            &rows,
            "-c",
            &cwd,
            "-e",
            &exit_env,
            "--",
            // A shell waits for the program and writes its status down:
            // tmux, had it started the program itself, sometimes marks the
            // pane dead before it has the status.
            "sh",
            "-c",
            r#""$@"; echo "$?" > "$KILN_TEST_EXIT""#,
            "sh",
        ];
        args.extend(argv);
        tmux.cmd(&args);
        let pid = tmux.cmd(&["display-message", "-p", "#{pid}"]);
        tmux.server = String::from_utf8_lossy(&pid.stdout).trim().parse().ok();
        tmux
    }

    fn exit_file(&self) -> PathBuf {
        self.dir.join(format!("tmux-{}.exit", self.session))
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn send(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", self.session];
        args.extend(keys);
        self.cmd(&args);
    }

    /// The pane's screen and scrollback, lines joined where they wrapped.
    pub fn screen(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-J", "-S", "-", "-t", self.session]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen has a line `line` (trailing blanks aside)
    /// `times` times; fails with the screen if `limit` passes first.
    pub fn wait_for_line(&self, line: &str, times: usize, limit: Duration) -> String {
        let count = |s: &str| s.lines().filter(|l| l.trim_end() == line).count();
        self.wait_for(&format!("a line {line:?} (x{times})"), limit, |s| {
            count(s) >= times
        })
    }

    /// Waits until `done` holds for the screen; fails with the screen,
    /// saying it found no `what`, if `limit` passes first.
    pub fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&str) -> bool) -> String {
        let found = poll_until(Instant::now() + limit, Duration::from_millis(100), || {
            let s = self.screen();
            done(&s).then_some(s)
        });
        found.unwrap_or_else(|| panic!("no {what} {SCREEN_TIMEOUT} {limit:?}:\n{}", self.screen()))
    }

    /// Waits for the program the session runs to end, and returns its
    /// exit status; `None` if `limit` passes first.
    pub fn wait_for_exit(&self, limit: Duration) -> Option<i32> {
        let file = self.exit_file();
        poll_until(Instant::now() + limit, Duration::from_millis(100), || {
            let text = fs::read_to_string(&file).ok()?;
            text.strip_suffix('\n')?.parse().ok()
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // The server may be gone already.
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stderr(Stdio::null())
            .status();
        if let Some(pid) = self.server {
            // Gone, or a zombie no one has reaped yet (its argv is empty).
            let cmdline = PathBuf::from(format!("/proc/{pid}/cmdline"));
            poll_until(
                Instant::now() + Duration::from_secs(10),
                Duration::from_millis(20),
                || {
                    fs::read(&cmdline)
                        .map_or(true, |c| c.is_empty())
                        .then_some(())
                },
            );
        }
    }
}
