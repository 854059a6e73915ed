//! The last lines of some output (a console, a build log, a step's
//! output), kept for the error message that shows them: a ring that holds
//! at most so many, dropping the oldest, so output of any length costs
//! bounded memory.

use std::collections::VecDeque;

/// At most `keep` lines, the latest.
#[derive(Debug, Clone)]
pub struct Tail<T = String> {
    lines: VecDeque<T>,
    keep: usize,
}

impl<T> Tail<T> {
    pub fn new(keep: usize) -> Tail<T> {
        Tail {
            lines: VecDeque::with_capacity(keep.min(1024)),
            keep,
        }
    }

    /// Adds `line`, dropping the oldest if the ring is full.
    pub fn push(&mut self, line: T) {
        if self.keep == 0 {
            return;
        }
        if self.lines.len() == self.keep {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// Every line kept, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.lines.iter()
    }

    /// The last `n` lines kept (fewer if there are fewer), oldest first.
    pub fn last(&self, n: usize) -> impl Iterator<Item = &T> {
        self.lines.iter().skip(self.lines.len().saturating_sub(n))
    }

    pub fn into_vec(self) -> Vec<T> {
        self.lines.into()
    }
}

/// The last `n` of `lines`, oldest first, holding no more than `n` at once.
pub fn last<T>(lines: impl IntoIterator<Item = T>, n: usize) -> Vec<T> {
    let mut tail = Tail::new(n);
    for line in lines {
        tail.push(line);
    }
    tail.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_lines_oldest_first() {
        let mut t = Tail::new(3);
        for i in 0..10 {
            t.push(i);
        }
        assert_eq!(t.iter().copied().collect::<Vec<_>>(), [7, 8, 9]);
        assert_eq!(t.last(2).copied().collect::<Vec<_>>(), [8, 9]);
        assert_eq!(t.last(100).count(), 3);
        assert_eq!(t.last(0).count(), 0);
        assert_eq!(t.into_vec(), [7, 8, 9]);

        let mut few = Tail::new(5);
        few.push("a");
        assert_eq!(few.into_vec(), ["a"]);
        let mut none = Tail::new(0);
        none.push("a");
        assert!(none.into_vec().is_empty());
    }

    #[test]
    fn last_of_an_iterator() {
        assert_eq!(last("a\nb\nc\nd".lines(), 2), ["c", "d"]);
        assert_eq!(last("a\nb".lines(), 5), ["a", "b"]);
        assert!(last("".lines(), 5).is_empty());
        assert!(last(0..10, 0).is_empty());
    }
}
