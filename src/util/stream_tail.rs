//! The last lines of a stream read on a thread of its own (a guest's
//! serial console, a helper's stderr): a [`Tail`] ring of recent lines for
//! error messages (a kernel panic, say), optionally echoed to stderr as they
//! come (`--console`).

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::util::tail::Tail;

const KEEP_LINES: usize = 200;
/// Longer lines are split, so a guest printing without newlines cannot grow
/// kiln's memory.
const MAX_LINE: u64 = 4096;

#[derive(Clone)]
pub struct StreamTail {
    lines: Arc<Mutex<Tail>>,
}

impl Default for StreamTail {
    fn default() -> StreamTail {
        StreamTail {
            lines: Arc::new(Mutex::new(Tail::new(KEEP_LINES))),
        }
    }
}

impl StreamTail {
    pub fn new() -> StreamTail {
        StreamTail::default()
    }

    /// Reads `source` to its end on a thread of its own.
    pub fn capture<R: Read + Send + 'static>(&self, source: R, echo: bool) -> JoinHandle<()> {
        let lines = self.lines.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(source);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if echo {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(&buf);
                    let _ = err.flush();
                }
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        })
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.last(n).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines() {
        let c = StreamTail::new();
        let text: String = (0..300).map(|i| format!("line {i}\r\n")).collect();
        c.capture(std::io::Cursor::new(text.into_bytes()), false)
            .join()
            .expect("join");
        assert_eq!(
            c.tail(2),
            vec!["line 298".to_string(), "line 299".to_string()]
        );
        assert_eq!(c.tail(1000).len(), KEEP_LINES);

        let c = StreamTail::new();
        let long = vec![b'x'; 3 * MAX_LINE as usize];
        c.capture(std::io::Cursor::new(long), false)
            .join()
            .expect("join");
        assert_eq!(c.tail(10).len(), 3);
        assert!(c.tail(10).iter().all(|l| l.len() == MAX_LINE as usize));
    }
}
