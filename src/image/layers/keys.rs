//! Each layer's cache key: the hash of the key below it and of the step
//! that makes it. The first step's "key below" is the base's: the root
//! archive, the tools image the steps run with, what every step gets
//! (environment, the recipe's files, the scripts they all source) and
//! this format's version. A change anywhere changes the key of the step
//! it touches and of every step after it, and of nothing before.

use crate::image::plan::Step;
use crate::sandbox::cache;

/// Bumped when what a layer holds changes meaning.
const FORMAT: &[u8] = b"kiln-layer-1";

/// What the base's key is made of.
pub struct Base<'a> {
    /// Identifies the root archive's contents.
    pub root: &'a str,
    /// The tools image's SHA-256.
    pub tools: &'a str,
    /// Every run's environment.
    pub env: &'a [(String, String)],
    /// The recipe's files' contents, in order.
    pub files: &'a [Vec<u8>],
    /// The text of the steps' common script and of the mount step.
    pub scripts: &'a [&'a str],
}

/// The key of each of `steps`' layers, in order.
pub fn keys(base: &Base, steps: &[Step]) -> Vec<String> {
    let mut parts: Vec<&[u8]> = vec![FORMAT, base.root.as_bytes(), base.tools.as_bytes()];
    for (k, v) in base.env {
        parts.push(k.as_bytes());
        parts.push(v.as_bytes());
    }
    for f in base.files {
        parts.push(f);
    }
    for s in base.scripts {
        parts.push(s.as_bytes());
    }
    let mut below = cache::hash(&parts);
    steps
        .iter()
        .map(|s| {
            below = cache::hash(&[FORMAT, below.as_bytes(), &s.fingerprint()]);
            below.clone()
        })
        .collect()
}
