//! Sizes as people write them: a whole number with an optional binary unit,
//! "512M", "4G", "4096K" (`--mem`, `--disk-size`, a recipe's sizes). Each
//! user decides which units it takes, what a bare number means and what to
//! say about a bad one. Self-contained, so the benches include this file too.

/// A unit a size may end in, either case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// No suffix: the user's own unit.
    None,
    K,
    M,
    G,
    T,
}

impl Unit {
    /// How many bytes one of this unit is (a bare number counts bytes).
    pub fn bytes(self) -> u64 {
        match self {
            Unit::None => 1,
            Unit::K => 1 << 10,
            Unit::M => 1 << 20,
            Unit::G => 1 << 30,
            Unit::T => 1 << 40,
        }
    }
}

/// The number and unit of `s` ("512M" is 512 and M); `None` if what is
/// before the unit is not a whole number. `s` is taken as it is: callers
/// that allow spaces trim it first.
pub fn parse(s: &str) -> Option<(u64, Unit)> {
    let (number, unit) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], Unit::K),
        Some((i, 'M' | 'm')) => (&s[..i], Unit::M),
        Some((i, 'G' | 'g')) => (&s[..i], Unit::G),
        Some((i, 'T' | 't')) => (&s[..i], Unit::T),
        _ => (s, Unit::None),
    };
    Some((number.parse().ok()?, unit))
}

// Each test imports what it tests: the benches include this file, with
// cfg(test) set but without #[test] functions.
#[cfg(test)]
mod tests {
    #[test]
    fn splits_the_number_from_its_unit() {
        use super::*;
        assert_eq!(parse("512M"), Some((512, Unit::M)));
        assert_eq!(parse("4g"), Some((4, Unit::G)));
        assert_eq!(parse("4096K"), Some((4096, Unit::K)));
        assert_eq!(parse("2T"), Some((2, Unit::T)));
        assert_eq!(parse("1000"), Some((1000, Unit::None)));
        assert_eq!(parse("0"), Some((0, Unit::None)));
        for bad in [
            "",
            "M",
            "x",
            "1.5G",
            "-1M",
            "5MB",
            "G5",
            " 5M",
            "99999999999999999999",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(Unit::None.bytes(), 1);
        assert_eq!(Unit::M.bytes(), 1 << 20);
        assert_eq!(Unit::T.bytes(), 1 << 40);
    }
}
