//! The tree's layers in kiln's cache: `<cache>/layers/<key>/`, each the
//! archive of what one step changed (`layer.tar`) and the lines it told
//! kiln (`marks`, e.g. the kernel the normalize step found), replayed when
//! the step is reused. A key is the hash of the layer below's key and of
//! everything the step is ([`super::keys`]), so a layer is only ever
//! reused on top of the very layers it was made on.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::image::plan::LayerSpan;
use crate::sandbox::cache::{self, Begin, CacheUse, Staging};

const KIND: &str = cache::LAYERS_KIND;
const ARCHIVE: &str = "layer.tar";
const MARKS: &str = "marks";

/// A layer in the cache, held (no gc removes it) while this lives.
pub struct Layer {
    pub archive: PathBuf,
    /// What the step printed for kiln, in order (`KILN_…` lines).
    pub marks: Vec<String>,
    _use: CacheUse,
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open() -> Result<Store> {
        Ok(Store {
            dir: cache::root()?.join(KIND),
        })
    }

    #[cfg(test)]
    fn at(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    fn entry(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The layer with `key`, if the cache has it whole and undamaged
    /// (a damaged one is said, and its step runs again).
    pub fn get(&self, key: &str) -> Option<Layer> {
        let dest = self.entry(key);
        let held = CacheUse::begin(&dest);
        if !cache::usable(&dest, &[ARCHIVE, MARKS], "") {
            return None;
        }
        let marks = fs::read_to_string(dest.join(MARKS)).ok()?;
        Some(Layer {
            archive: dest.join(ARCHIVE),
            marks: marks.lines().map(str::to_string).collect(),
            _use: held,
        })
    }

    /// Stores the layer archive `archive` under `key`, with `marks`. An
    /// entry another kiln stored meanwhile is kept unless `replace`
    /// (`--fresh`: its step ran again, and the cache takes what it made).
    /// The build goes on with its own copy, whatever another kiln does to
    /// the cache's.
    pub fn put(&self, key: &str, archive: &Path, marks: &[String], replace: bool) -> Result<()> {
        let dest = self.entry(key);
        let _held = CacheUse::begin(&dest);
        // A damaged entry is replaced too.
        let complete = |d: &Path| {
            cache::complete(d, &[ARCHIVE, MARKS]) && cache::verify(d, &[ARCHIVE, MARKS], "").is_ok()
        };
        let staging = match Staging::begin(&dest, replace, complete)? {
            Begin::Done(_) => return Ok(()),
            Begin::Build(s) => s,
        };
        let to = staging.path().join(ARCHIVE);
        fs::copy(archive, &to).with_context(|| format!("copying a layer to {}", to.display()))?;
        let mut text = String::new();
        for m in marks {
            text.push_str(m);
            text.push('\n');
        }
        fs::write(staging.path().join(MARKS), text)?;
        // Synced and recorded (size, SHA-256): a crash must not publish a
        // layer whose data never landed, and later damage is caught.
        staging.commit_with_manifest(&[ARCHIVE, MARKS])?;
        Ok(())
    }
}

/// Copies `span` of `disk` to a new file `to`.
pub fn copy_span(disk: &Path, span: LayerSpan, to: &Path) -> Result<()> {
    let mut from =
        File::open(disk).with_context(|| format!("opening the layers disk {}", disk.display()))?;
    let len = from.metadata()?.len();
    if span
        .offset
        .checked_add(span.size)
        .map_or(true, |end| end > len)
    {
        bail!(
            "the build VM reported a layer at bytes {}..+{} of a {len}-byte layers disk",
            span.offset,
            span.size
        );
    }
    from.seek(SeekFrom::Start(span.offset))?;
    let mut out = File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let copied = std::io::copy(&mut from.take(span.size), &mut out)
        .with_context(|| format!("copying a layer to {}", to.display()))?;
    if copied != span.size {
        bail!("the layers disk ended inside a layer");
    }
    out.flush()?;
    Ok(())
}

/// Writes `archives` one after another into `disk` from byte 0, each at
/// a MiB boundary (the VM writes them with direct I/O), and returns where
/// each is and where the disk is free from.
pub fn lay_out(archives: &[&Path], disk: &Path) -> Result<(Vec<LayerSpan>, u64)> {
    let mut out = fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening the layers disk {}", disk.display()))?;
    let mut spans = Vec::new();
    let mut offset = 0;
    for a in archives {
        let mut f = File::open(a).with_context(|| format!("opening {}", a.display()))?;
        out.seek(SeekFrom::Start(offset))?;
        let size = std::io::copy(&mut f, &mut out)
            .with_context(|| format!("copying {} to the layers disk", a.display()))?;
        spans.push(LayerSpan { offset, size });
        offset = (offset + size).div_ceil(MIB) * MIB;
    }
    Ok((spans, offset))
}

const MIB: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_goes_in_and_comes_back_with_its_marks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let disk = tmp.path().join("disk");
        let data: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
        fs::write(&disk, &data).expect("disk");
        let store = Store::at(&tmp.path().join("layers"));
        assert!(store.get("k").is_none());
        let span = LayerSpan {
            offset: MIB,
            size: MIB,
        };
        let marks = vec!["KILN_KERNEL=vmlinuz-6.1".to_string()];
        let own = tmp.path().join("own.tar");
        copy_span(&disk, span, &own).expect("copy");
        store.put("k", &own, &marks, false).expect("put");
        let got = store.get("k").expect("stored");
        assert_eq!(got.marks, marks);
        let archive = fs::read(&got.archive).expect("archive");
        assert_eq!(archive, data[MIB as usize..2 * MIB as usize]);
        // Another kiln's entry is kept, unless the step ran --fresh.
        let other = tmp.path().join("other.tar");
        fs::write(&other, b"other").expect("other");
        store.put("k", &other, &[], false).expect("put");
        assert_eq!(store.get("k").expect("kept").marks, marks);
        store.put("k", &other, &[], true).expect("put");
        let got = store.get("k").expect("replaced");
        assert_eq!(fs::read(&got.archive).expect("archive"), b"other");
        assert!(got.marks.is_empty());
        // Damaged: not used, and replaced by the next put.
        fs::write(&got.archive, b"0ther").expect("damage");
        assert!(store.get("k").is_none());
        store.put("k", &own, &marks, false).expect("put");
        assert_eq!(store.get("k").expect("repaired").marks, marks);
        // A span past the disk's end is an error, not a short layer.
        let past = LayerSpan {
            offset: 2 * MIB,
            size: 2 * MIB,
        };
        assert!(copy_span(&disk, past, &tmp.path().join("past")).is_err());
    }

    #[test]
    fn layers_are_laid_out_at_mib_boundaries() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        fs::write(&a, vec![1u8; 1000]).expect("a");
        fs::write(&b, vec![2u8; 10]).expect("b");
        let disk = tmp.path().join("disk");
        File::create(&disk)
            .and_then(|f| f.set_len(4 * MIB))
            .expect("disk");
        let (spans, next) = lay_out(&[&a, &b], &disk).expect("lay out");
        assert_eq!(
            spans,
            [
                LayerSpan {
                    offset: 0,
                    size: 1000
                },
                LayerSpan {
                    offset: MIB,
                    size: 10
                }
            ]
        );
        assert_eq!(next, 2 * MIB);
        let d = fs::read(&disk).expect("read");
        assert_eq!(d[MIB as usize], 2);
        assert_eq!(d[999], 1);
    }
}
