//! Stacks tar archives the way overlayfs stacks directories, into one
//! canonical pax archive.
//!
//! Archive 0 is the base tree; each later archive is an overlayfs upper
//! directory as GNU tar archived it, so it carries overlayfs's markers:
//!
//! - a character device 0/0 is a *whiteout*: the path, and everything
//!   under it, is gone from the archives below. Since Linux 5.8 overlayfs
//!   hard-links its whiteouts to one shared inode, so a hard link to a
//!   whiteout is a whiteout too. A 0/0 device in the base is treated the
//!   same way (nothing is below it, so it just disappears): a root tree
//!   has no use for one and it keeps the rule uniform.
//! - a directory with the xattr `trusted.overlay.opaque=y` is *opaque*:
//!   the children the archives below give it are hidden.
//! - any other non-directory hides the path and its subtree below it; a
//!   directory replaces a non-directory below it and merges with a
//!   directory below it, its own metadata winning.
//!
//! Other `trusted.overlay.*` xattrs are overlayfs's bookkeeping and are
//! dropped; `redirect` and `metacopy` mean a file's contents or a
//! directory's children live elsewhere in the stack, which a plain
//! archive of the upper directory can't express, so they are refused.
//!
//! The output is read by `mke2fs -d -`, which places inodes and blocks in
//! the order it reads entries. An image must come out byte-identical
//! whether its layers were reused from the cache or made afresh, so the
//! output depends only on the merged tree: entries go depth first, each
//! directory followed by its children sorted by name bytes (what
//! `tar --sort=name` writes), every header is rebuilt in one fixed form,
//! and a hard-link group's data goes with whichever surviving name comes
//! first in that order.
//!
//! Hard links name an earlier entry of their own archive. A group (an
//! archive's data entry and its links) keeps the members that win at
//! their paths; the first of them carries the data entry's contents and
//! the rest link to it. All members carry the data entry's metadata:
//! they are one inode, and mke2fs applies each entry's metadata to it.
//!
//! Entries are indexed first (metadata and where their data lies), then
//! written, their data copied straight from the source archives.

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};

const BLOCK: u64 = 512;
/// Sizes from here up don't fit ustar's 11 octal digits (8 GiB).
const USTAR_SIZE_LIMIT: u64 = 1 << 33;
/// The most a pax or GNU long-name member may hold: far above any real
/// one, low enough that a corrupt size can't exhaust memory.
const MAX_META: u64 = 16 << 20;
const COPY_BUF: usize = 1 << 20;
const OVERLAY_XATTRS: &[u8] = b"SCHILY.xattr.trusted.overlay.";
const OPAQUE: &[u8] = b"SCHILY.xattr.trusted.overlay.opaque";
/// overlayfs features whose meaning lies outside the upper directory.
const REFUSED: [&[u8]; 2] = [
    b"SCHILY.xattr.trusted.overlay.redirect",
    b"SCHILY.xattr.trusted.overlay.metacopy",
];

/// What [`merge`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeSummary {
    /// Entries in the output, not counting pax headers.
    pub entries: u64,
    /// File data bytes, not counting headers and padding.
    pub bytes: u64,
}

/// Why [`merge`] failed, naming the archive and, where there is one, the entry.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("cannot read archive {}: {source}", archive.display())]
    Read {
        archive: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("archive {} is malformed at byte {offset}: {reason}", archive.display())]
    Malformed {
        archive: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("archive {}, entry {entry:?}: {reason}", archive.display())]
    Unsupported {
        archive: PathBuf,
        entry: String,
        reason: String,
    },
    #[error(
        "archive {}: hard link {entry:?} names {target:?}, which is no earlier entry of that archive",
        archive.display()
    )]
    MissingLinkTarget {
        archive: PathBuf,
        entry: String,
        target: String,
    },
    #[error("cannot write the merged archive: {0}")]
    Write(#[source] io::Error),
}

/// Merges `archives` (the base first, then each upper directory's, lowest
/// first) into one pax archive on `out`. On error, `out` may hold part of
/// an archive.
pub fn merge(archives: &[&Path], out: &mut dyn Write) -> Result<MergeSummary, MergeError> {
    let indexed = archives
        .iter()
        .map(|path| index(path))
        .collect::<Result<Vec<_>, _>>()?;
    let tree = stack(&indexed);
    emit(archives, &indexed, &tree, out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    /// A hard link to the data entry at this index of the same archive.
    Link(usize),
    Whiteout,
}

impl Kind {
    fn typeflag(self) -> u8 {
        match self {
            Kind::File => b'0',
            Kind::Link(_) => b'1',
            Kind::Symlink => b'2',
            Kind::Char | Kind::Whiteout => b'3',
            Kind::Block => b'4',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
        }
    }
}

type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// One entry of an archive, as indexed.
struct Entry {
    /// Normalized: no `./`, no leading or trailing `/`; empty is the root.
    path: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    dev: (u32, u32),
    size: u64,
    /// Where the data starts in the archive.
    offset: u64,
    /// A symlink's target, as stored.
    symlink: Vec<u8>,
    /// The pax records that go through to the output, in source order.
    records: Records,
    opaque: bool,
}

/// Reads an archive's headers, seeking over the data.
struct Reader<'a> {
    archive: &'a Path,
    inner: BufReader<File>,
    pos: u64,
    len: u64,
}

impl Reader<'_> {
    fn read_err(&self) -> impl FnOnce(io::Error) -> MergeError + '_ {
        |source| MergeError::Read {
            archive: self.archive.to_path_buf(),
            source,
        }
    }

    fn malformed(&self, offset: u64, reason: impl Into<String>) -> MergeError {
        MergeError::Malformed {
            archive: self.archive.to_path_buf(),
            offset,
            reason: reason.into(),
        }
    }

    fn header(&mut self) -> Result<[u8; 512], MergeError> {
        let mut block = [0u8; 512];
        let mut got = 0;
        while got < block.len() {
            match self.inner.read(&mut block[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err()(e)),
            }
        }
        if got < block.len() {
            // GNU tar always ends with zero blocks: without them the
            // archive was cut short, even if it was cut between entries.
            return Err(self.malformed(
                self.pos + got as u64,
                "the archive ends without its end-of-archive blocks (truncated?)",
            ));
        }
        self.pos += BLOCK;
        Ok(block)
    }

    /// Passes over `size` bytes of member data and its padding, returning
    /// where the data starts.
    fn data(&mut self, size: u64, what: impl FnOnce() -> String) -> Result<u64, MergeError> {
        let start = self.pos;
        if size > self.len.saturating_sub(start) {
            return Err(self.malformed(
                start,
                format!(
                    "{}: its {size} bytes of data run past the end of the archive (truncated?)",
                    what()
                ),
            ));
        }
        let padded = size.div_ceil(BLOCK) * BLOCK;
        // Bounded by the file's length, which fits an i64.
        let skip = i64::try_from(padded).map_err(|_| self.malformed(start, "size overflow"))?;
        self.inner.seek_relative(skip).map_err(self.read_err())?;
        self.pos += padded;
        Ok(start)
    }

    /// A pax or GNU long-name member's contents.
    fn member(&mut self, size: u64, what: &str) -> Result<Vec<u8>, MergeError> {
        let at = self.pos;
        if size > MAX_META {
            return Err(self.malformed(at, format!("{what} of {size} bytes is implausibly large")));
        }
        if size > self.len.saturating_sub(at) {
            return Err(self.malformed(at, format!("{what} runs past the end of the archive")));
        }
        let mut data = vec![0; size as usize];
        self.inner.read_exact(&mut data).map_err(self.read_err())?;
        self.pos += size;
        let pad = (BLOCK - size % BLOCK) % BLOCK;
        self.inner
            .seek_relative(pad as i64)
            .map_err(self.read_err())?;
        self.pos += pad;
        Ok(data)
    }
}

/// Indexes one archive: every entry in archive order, hard links resolved
/// to their data entry.
fn index(archive: &Path) -> Result<Vec<Entry>, MergeError> {
    let read_err = |source| MergeError::Read {
        archive: archive.to_path_buf(),
        source,
    };
    let file = File::open(archive).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    let mut r = Reader {
        archive,
        inner: BufReader::with_capacity(64 << 10, file),
        pos: 0,
        len,
    };
    let unsupported = |entry: &[u8], reason: String| MergeError::Unsupported {
        archive: archive.to_path_buf(),
        entry: lossy(entry),
        reason,
    };

    let mut entries: Vec<Entry> = Vec::new();
    // The latest entry at each path so far: what a hard link names.
    let mut latest: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut pax: Option<Records> = None;
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    loop {
        let at = r.pos;
        let h = r.header()?;
        if h.iter().all(|&b| b == 0) {
            if pax.is_some() || long_name.is_some() || long_link.is_some() {
                return Err(r.malformed(at, "an extended header is followed by no entry"));
            }
            break;
        }
        if !checksum_ok(&h) {
            return Err(r.malformed(at, "header checksum mismatch"));
        }
        let flag = h[156];
        let header_size = num(&h[124..136]).ok_or_else(|| r.malformed(at, "bad size field"))?;
        match flag {
            b'x' => {
                if pax.is_some() {
                    return Err(r.malformed(at, "two pax headers for one entry"));
                }
                let data = r.member(header_size, "a pax header")?;
                let records =
                    parse_pax(&data).map_err(|e| r.malformed(at, format!("pax header: {e}")))?;
                pax = Some(records);
                continue;
            }
            // Global headers set defaults GNU tar never relies on here.
            b'g' => {
                r.data(header_size, || "a global pax header".into())?;
                continue;
            }
            b'L' | b'K' => {
                let mut name = r.member(header_size, "a GNU long name")?;
                while name.last() == Some(&0) {
                    name.pop();
                }
                *(if flag == b'L' {
                    &mut long_name
                } else {
                    &mut long_link
                }) = Some(name);
                continue;
            }
            _ => {}
        }

        let records = pax.take().unwrap_or_default();
        let name = match last(&records, b"path") {
            Some(p) => p.to_vec(),
            None => long_name.take().unwrap_or_else(|| header_name(&h)),
        };
        long_name = None;
        let link = match last(&records, b"linkpath") {
            Some(l) => l.to_vec(),
            None => long_link
                .take()
                .unwrap_or_else(|| cstr(&h[157..257]).to_vec()),
        };
        long_link = None;
        let size = match last(&records, b"size") {
            Some(v) => dec(v).ok_or_else(|| r.malformed(at, "bad pax size"))?,
            None => header_size,
        };
        let offset = r.data(size, || format!("entry {:?}", lossy(&name)))?;

        if flag == b'S' || records.iter().any(|(k, _)| k.starts_with(b"GNU.sparse.")) {
            return Err(unsupported(
                &name,
                "sparse files are not supported (archive without --sparse)".into(),
            ));
        }
        if let Some((k, _)) = records
            .iter()
            .find(|(k, _)| REFUSED.contains(&k.as_slice()))
        {
            return Err(unsupported(
                &name,
                format!("the overlayfs xattr {} is not supported", lossy(&k[13..])),
            ));
        }
        let path = normalize(&name).map_err(|e| unsupported(&name, e))?;
        let field = |range: std::ops::Range<usize>, what: &str| {
            num(&h[range]).ok_or_else(|| r.malformed(at, format!("bad {what} field")))
        };
        let dev = if matches!(flag, b'3' | b'4') {
            let major = field(329..337, "devmajor")?;
            let minor = field(337..345, "devminor")?;
            match (u32::try_from(major), u32::try_from(minor)) {
                (Ok(major), Ok(minor)) => (major, minor),
                _ => return Err(r.malformed(at, "device number out of range")),
            }
        } else {
            (0, 0)
        };
        let kind = match flag {
            b'0' | b'\0' | b'7' => Kind::File,
            b'1' => {
                let target = normalize(&link).map_err(|e| unsupported(&name, e))?;
                let Some(&t) = latest.get(&target) else {
                    return Err(MergeError::MissingLinkTarget {
                        archive: archive.to_path_buf(),
                        entry: lossy(&name),
                        target: lossy(&link),
                    });
                };
                match entries[t].kind {
                    Kind::Link(data) => Kind::Link(data),
                    Kind::Whiteout => Kind::Whiteout,
                    Kind::Dir => {
                        return Err(unsupported(&name, "a hard link to a directory".into()))
                    }
                    _ => Kind::Link(t),
                }
            }
            b'2' => Kind::Symlink,
            b'3' if dev == (0, 0) => Kind::Whiteout,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => {
                return Err(unsupported(
                    &name,
                    format!("entry type {:?} is not supported", char::from(other)),
                ))
            }
        };
        if path.is_empty() && kind != Kind::Dir {
            return Err(unsupported(&name, "the root is not a directory".into()));
        }
        // pax uid/gid stand for values too large for the header.
        let uid = match last(&records, b"uid") {
            Some(v) => dec(v).ok_or_else(|| r.malformed(at, "bad pax uid"))?,
            None => field(108..116, "uid")?,
        };
        let gid = match last(&records, b"gid") {
            Some(v) => dec(v).ok_or_else(|| r.malformed(at, "bad pax gid"))?,
            None => field(116..124, "gid")?,
        };
        // A negative (base-256) mtime becomes 0 in the header; its pax
        // record, if any, still says what it is.
        let mtime = num(&h[136..148])
            .or_else(|| (h[136] == 0xff).then_some(0))
            .ok_or_else(|| r.malformed(at, "bad mtime field"))?;
        // Only permission bits: libarchive takes file-type bits in a hard
        // link's mode as its type and would write a file instead of a link.
        let mode = field(100..108, "mode")? as u32 & 0o7777;
        let opaque = kind == Kind::Dir
            && records
                .iter()
                .any(|(k, v)| k.as_slice() == OPAQUE && v.as_slice() == b"y");
        let records = records
            .into_iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_slice(),
                    b"path" | b"linkpath" | b"size" | b"hdrcharset"
                ) && !k.starts_with(OVERLAY_XATTRS)
            })
            .collect();

        latest.insert(path.clone(), entries.len());
        entries.push(Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            dev,
            size: if kind == Kind::File { size } else { 0 },
            offset,
            symlink: if kind == Kind::Symlink {
                link
            } else {
                Vec::new()
            },
            records,
            opaque,
        });
    }
    Ok(entries)
}

/// The merged tree: for each path, in output order, the (archive, entry)
/// that wins it.
type Tree = BTreeMap<Vec<u8>, (usize, usize)>;

/// The tree's key for `path`: `/` becomes NUL, the one byte below every
/// name byte, so byte order is depth-first order with each directory's
/// children sorted by name.
fn key(path: &[u8]) -> Vec<u8> {
    path.iter()
        .map(|&b| if b == b'/' { 0 } else { b })
        .collect()
}

/// Removes everything strictly under `key` from `tree`.
fn remove_below(tree: &mut Tree, key: &[u8]) {
    let below: Vec<Vec<u8>> = if key.is_empty() {
        tree.range::<[u8], _>((Bound::Excluded(&[][..]), Bound::Unbounded))
            .map(|(k, _)| k.clone())
            .collect()
    } else {
        let start = [key, &[0]].concat();
        let end = [key, &[1]].concat();
        tree.range(start..end).map(|(k, _)| k.clone()).collect()
    };
    for k in below {
        tree.remove(&k);
    }
}

fn stack(archives: &[Vec<Entry>]) -> Tree {
    let mut tree = Tree::new();
    for (a, entries) in archives.iter().enumerate() {
        // What this archive hides, while the tree holds only the archives
        // below it...
        for e in entries {
            let k = key(&e.path);
            if e.kind == Kind::Dir {
                if let Some(&(la, li)) = tree.get(&k) {
                    if archives[la][li].kind != Kind::Dir {
                        tree.remove(&k);
                    }
                }
                if e.opaque {
                    remove_below(&mut tree, &k);
                }
            } else {
                tree.remove(&k);
                remove_below(&mut tree, &k);
            }
        }
        // ...then what it adds; within an archive the last entry for a
        // path wins, as when extracting it.
        for (i, e) in entries.iter().enumerate() {
            let k = key(&e.path);
            if e.kind != Kind::Whiteout {
                tree.insert(k, (a, i));
            } else if tree.get(&k).is_some_and(|&(wa, _)| wa == a) {
                tree.remove(&k);
            }
        }
    }
    tree
}

fn emit(
    paths: &[&Path],
    archives: &[Vec<Entry>],
    tree: &Tree,
    out: &mut dyn Write,
) -> Result<MergeSummary, MergeError> {
    let mut sources = paths
        .iter()
        .map(|p| {
            File::open(p).map_err(|source| MergeError::Read {
                archive: p.to_path_buf(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut w = BufWriter::with_capacity(COPY_BUF, out);
    let mut buf = vec![0u8; COPY_BUF];
    let mut summary = MergeSummary {
        entries: 0,
        bytes: 0,
    };
    // Each hard-link group's name in the output, once it has one.
    let mut groups: HashMap<(usize, usize), Vec<u8>> = HashMap::new();
    for &(a, i) in tree.values() {
        let e = &archives[a][i];
        let mut name = b"./".to_vec();
        name.extend_from_slice(&e.path);
        if e.kind == Kind::Dir && !e.path.is_empty() {
            // As GNU tar names directories.
            name.push(b'/');
        }
        let data = match e.kind {
            Kind::Link(d) => d,
            _ => i,
        };
        let d = &archives[a][data];
        if d.kind == Kind::Dir {
            write_entry(&mut w, d, &name, Kind::Dir.typeflag(), b"", 0)?;
        } else {
            match groups.entry((a, data)) {
                Slot::Occupied(first) => {
                    write_entry(&mut w, d, &name, b'1', first.get(), 0)?;
                }
                Slot::Vacant(slot) => {
                    write_entry(&mut w, d, &name, d.kind.typeflag(), &d.symlink, d.size)?;
                    copy(&mut sources[a], paths[a], d, &mut w, &mut buf)?;
                    summary.bytes += d.size;
                    slot.insert(name);
                }
            }
        }
        summary.entries += 1;
    }
    w.write_all(&[0; 2 * BLOCK as usize])
        .and_then(|()| w.flush())
        .map_err(MergeError::Write)?;
    Ok(summary)
}

/// Writes `e`'s pax and ustar headers under `name`.
fn write_entry(
    w: &mut impl Write,
    e: &Entry,
    name: &[u8],
    typeflag: u8,
    linkpath: &[u8],
    size: u64,
) -> Result<(), MergeError> {
    let mut pax = Vec::with_capacity(256);
    push_record(&mut pax, b"hdrcharset", b"BINARY");
    push_record(&mut pax, b"path", name);
    if !linkpath.is_empty() {
        push_record(&mut pax, b"linkpath", linkpath);
    }
    if size >= USTAR_SIZE_LIMIT {
        push_record(&mut pax, b"size", size.to_string().as_bytes());
    }
    for (k, v) in &e.records {
        push_record(&mut pax, k, v);
    }
    let pax_header = ustar(&Fields {
        name: b"././@PaxHeader",
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: pax.len() as u64,
        mtime: 0,
        typeflag: b'x',
        linkname: b"",
        dev: (0, 0),
    });
    let header = ustar(&Fields {
        name,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size,
        mtime: e.mtime,
        typeflag,
        linkname: linkpath,
        dev: e.dev,
    });
    w.write_all(&pax_header)
        .and_then(|()| w.write_all(&pax))
        .and_then(|()| pad(w, pax.len() as u64))
        .and_then(|()| w.write_all(&header))
        .map_err(MergeError::Write)
}

/// Copies `e`'s data, and its padding, from `archive` to `w`.
fn copy(
    src: &mut File,
    archive: &Path,
    e: &Entry,
    w: &mut impl Write,
    buf: &mut [u8],
) -> Result<(), MergeError> {
    let read_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            MergeError::Malformed {
                archive: archive.to_path_buf(),
                offset: e.offset,
                reason: format!("the data of {:?} ends early", lossy(&e.path)),
            }
        } else {
            MergeError::Read {
                archive: archive.to_path_buf(),
                source,
            }
        }
    };
    src.seek(SeekFrom::Start(e.offset)).map_err(read_err)?;
    let mut left = e.size;
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        src.read_exact(&mut buf[..n]).map_err(read_err)?;
        w.write_all(&buf[..n]).map_err(MergeError::Write)?;
        left -= n as u64;
    }
    pad(w, e.size).map_err(MergeError::Write)
}

fn pad(w: &mut impl Write, len: u64) -> io::Result<()> {
    let fill = (BLOCK - len % BLOCK) % BLOCK;
    w.write_all(&[0; BLOCK as usize][..fill as usize])
}

struct Fields<'a> {
    name: &'a [u8],
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    typeflag: u8,
    linkname: &'a [u8],
    dev: (u32, u32),
}

/// A ustar header. Names longer than their fields are cut: the pax
/// records before it carry them whole.
fn ustar(f: &Fields) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = f.name.len().min(100);
    h[..n].copy_from_slice(&f.name[..n]);
    put_num(&mut h[100..108], f.mode.into());
    put_num(&mut h[108..116], f.uid);
    put_num(&mut h[116..124], f.gid);
    put_num(&mut h[124..136], f.size);
    put_num(&mut h[136..148], f.mtime);
    h[156] = f.typeflag;
    let n = f.linkname.len().min(100);
    h[157..157 + n].copy_from_slice(&f.linkname[..n]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    put_num(&mut h[329..337], f.dev.0.into());
    put_num(&mut h[337..345], f.dev.1.into());
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    // At most 512 * 255, six octal digits.
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Octal with a NUL when it fits, else GNU's base-256 (which GNU tar and
/// libarchive read), saturating.
fn put_num(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    if v >> (3 * digits) == 0 {
        field[..digits].copy_from_slice(format!("{v:0digits$o}").as_bytes());
        field[digits] = 0;
    } else {
        let room = field.len() - 1;
        field.fill(0);
        field[0] = 0x80;
        let bytes = v.to_be_bytes();
        if room >= bytes.len() {
            let at = field.len() - bytes.len();
            field[at..].copy_from_slice(&bytes);
        } else if v >> (8 * room) == 0 {
            field[1..].copy_from_slice(&bytes[bytes.len() - room..]);
        } else {
            field[1..].fill(0xff);
        }
    }
}

/// Appends a pax record, `"<len> <key>=<value>\n"`, where `len` counts
/// the whole record, its own digits included.
fn push_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut digits = 1;
    while (rest + digits).to_string().len() != digits {
        digits += 1;
    }
    out.extend_from_slice((rest + digits).to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Parses pax records by their lengths: values (binary xattrs such as
/// `security.capability`) may hold any byte, newlines included.
fn parse_pax(mut data: &[u8]) -> Result<Records, String> {
    let mut records = Vec::new();
    // Some writers pad the member with NULs.
    while !data.is_empty() && data.iter().any(|&b| b != 0) {
        let space = data
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or("a record without a length")?;
        let len = std::str::from_utf8(&data[..space])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or("a record with a bad length")?;
        if len < space + 3 || len > data.len() || data[len - 1] != b'\n' {
            return Err(format!("a record of length {len} that doesn't fit"));
        }
        let body = &data[space + 1..len - 1];
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a record without `=`")?;
        records.push((body[..eq].to_vec(), body[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(records)
}

/// The last record for `key`: later records override earlier ones.
fn last<'a>(records: &'a Records, key: &[u8]) -> Option<&'a [u8]> {
    records
        .iter()
        .rev()
        .find(|(k, _)| k.as_slice() == key)
        .map(|(_, v)| v.as_slice())
}

fn header_name(h: &[u8; 512]) -> Vec<u8> {
    let name = cstr(&h[..100]);
    // POSIX ustar splits long names; GNU's "ustar  " header uses that
    // space for other things.
    let prefix = if &h[257..263] == b"ustar\0" {
        cstr(&h[345..500])
    } else {
        &[]
    };
    if prefix.is_empty() {
        name.to_vec()
    } else {
        [prefix, b"/", name].concat()
    }
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn checksum_ok(h: &[u8; 512]) -> bool {
    let Some(stored) = num(&h[148..156]) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        // Some old tars summed signed chars.
        signed += i64::from(b as i8);
    }
    stored == unsigned || i64::try_from(stored) == Ok(signed)
}

/// A numeric header field: octal, or positive GNU base-256.
fn num(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] == 0xff {
            return None; // negative
        }
        let mut v = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let digits = field
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| b != 0 && b != b' ');
    let mut v: u64 = 0;
    for &b in digits {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

fn dec(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A name as the tree's path: `./`, leading and trailing `/` and `.`
/// components dropped; empty for the root.
fn normalize(name: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(name.len());
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("the name has a `..` component".into()),
            _ if part.contains(&0) => return Err("the name has a NUL byte".into()),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(part);
            }
        }
    }
    Ok(out)
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::process::Command;

    /// An input entry.
    #[derive(Clone)]
    struct E {
        name: Vec<u8>,
        flag: u8,
        data: Vec<u8>,
        link: Vec<u8>,
        mode: u32,
        uid: u64,
        mtime: u64,
        dev: (u32, u32),
        pax: Vec<(String, Vec<u8>)>,
    }

    fn entry(flag: u8, name: &[u8]) -> E {
        E {
            name: name.to_vec(),
            flag,
            data: Vec::new(),
            link: Vec::new(),
            mode: if flag == b'5' { 0o755 } else { 0o644 },
            uid: 0,
            mtime: 1_700_000_000,
            dev: (0, 0),
            pax: Vec::new(),
        }
    }
    fn dir(name: &str) -> E {
        entry(b'5', name.as_bytes())
    }
    fn file(name: &str, data: &str) -> E {
        E {
            data: data.as_bytes().to_vec(),
            ..entry(b'0', name.as_bytes())
        }
    }
    fn hardlink(name: &str, target: &str) -> E {
        E {
            link: target.as_bytes().to_vec(),
            ..entry(b'1', name.as_bytes())
        }
    }
    fn symlink(name: &str, target: &str) -> E {
        E {
            link: target.as_bytes().to_vec(),
            ..entry(b'2', name.as_bytes())
        }
    }
    fn whiteout(name: &str) -> E {
        entry(b'3', name.as_bytes())
    }
    impl E {
        fn xattr(mut self, key: &str, value: &[u8]) -> E {
            self.pax
                .push((format!("SCHILY.xattr.{key}"), value.to_vec()));
            self
        }
        fn opaque(self) -> E {
            self.xattr("trusted.overlay.opaque", b"y")
        }
        fn mode(self, mode: u32) -> E {
            E { mode, ..self }
        }
        fn uid(self, uid: u64) -> E {
            E { uid, ..self }
        }
    }

    /// An archive as GNU tar --format=pax would write it: each entry
    /// behind a pax header naming it.
    fn tar_bytes(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut pax: Vec<(&str, &[u8])> = vec![("path", &e.name)];
            if !e.link.is_empty() {
                pax.push(("linkpath", &e.link));
            }
            pax.extend(e.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
            b.append_pax_extensions(pax).expect("pax");
            let mut h = tar::Header::new_ustar();
            {
                let u = h.as_ustar_mut().expect("ustar");
                let n = e.name.len().min(100);
                u.name[..n].copy_from_slice(&e.name[..n]);
                let n = e.link.len().min(100);
                u.linkname[..n].copy_from_slice(&e.link[..n]);
            }
            h.set_entry_type(tar::EntryType::new(e.flag));
            h.set_mode(e.mode);
            h.set_uid(e.uid);
            h.set_gid(0);
            h.set_mtime(e.mtime);
            h.set_size(e.data.len() as u64);
            h.set_device_major(e.dev.0).expect("major");
            h.set_device_minor(e.dev.1).expect("minor");
            h.set_cksum();
            b.append(&h, e.data.as_slice()).expect("append");
        }
        b.into_inner().expect("finish")
    }

    fn write_archives(dir: &Path, layers: &[Vec<E>]) -> Vec<PathBuf> {
        layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let p = dir.join(format!("{i}.tar"));
                fs::write(&p, tar_bytes(l)).expect("write archive");
                p
            })
            .collect()
    }

    fn try_run(layers: &[Vec<E>]) -> Result<Vec<u8>, MergeError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = write_archives(dir.path(), layers);
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let mut out = Vec::new();
        let summary = merge(&refs, &mut out)?;
        let listed = list(&out);
        assert_eq!(summary.entries, listed.len() as u64);
        let data: u64 = listed.iter().map(|o| o.data.len() as u64).sum();
        assert_eq!(summary.bytes, data);
        Ok(out)
    }

    fn run(layers: &[Vec<E>]) -> Vec<u8> {
        try_run(layers).expect("merge")
    }

    /// An output entry.
    #[derive(Debug)]
    struct Out {
        name: Vec<u8>,
        flag: u8,
        link: Vec<u8>,
        data: Vec<u8>,
        mode: u32,
        uid: u64,
        records: Records,
    }

    impl Out {
        fn record(&self, key: &str) -> Option<&[u8]> {
            last(&self.records, key.as_bytes())
        }
    }

    /// Reads the output raw, checking each entry's pax header's form.
    fn list(out: &[u8]) -> Vec<Out> {
        let mut ar = tar::Archive::new(out);
        let mut pax: Option<Records> = None;
        let mut listed = Vec::new();
        for ent in ar.entries().expect("entries").raw(true) {
            let mut ent = ent.expect("entry");
            let mut data = Vec::new();
            ent.read_to_end(&mut data).expect("read");
            let h = ent.header();
            if h.entry_type() == tar::EntryType::XHeader {
                // Rebuilding the records reproduces them byte for byte.
                let records = parse_pax(&data).expect("pax");
                let mut again = Vec::new();
                for (k, v) in &records {
                    push_record(&mut again, k, v);
                }
                assert_eq!(again, data);
                pax = Some(records);
                continue;
            }
            let records = pax.take().expect("a pax header before each entry");
            assert_eq!(records[0], (b"hdrcharset".to_vec(), b"BINARY".to_vec()));
            assert_eq!(records[1].0, b"path");
            let name = records[1].1.clone();
            assert_eq!(
                &h.as_bytes()[..name.len().min(100)],
                &name[..name.len().min(100)]
            );
            let link = last(&records, b"linkpath").unwrap_or_default().to_vec();
            listed.push(Out {
                name,
                flag: h.entry_type().as_byte(),
                link,
                data,
                mode: h.mode().expect("mode"),
                uid: h.uid().expect("uid"),
                records,
            });
        }
        listed
    }

    fn names(out: &[u8]) -> Vec<String> {
        list(out).iter().map(|o| lossy(&o.name)).collect()
    }

    fn find<'a>(listed: &'a [Out], name: &str) -> &'a Out {
        listed
            .iter()
            .find(|o| o.name == name.as_bytes())
            .unwrap_or_else(|| panic!("{name} not in output"))
    }

    fn base() -> Vec<E> {
        vec![
            dir("./"),
            dir("./a/"),
            file("./a/x", "ax"),
            dir("./a/sub/"),
            file("./a/sub/y", "y"),
            file("./a.b", "dot"),
            dir("./b/"),
            file("./b/z", "z"),
            symlink("./c", "a/x"),
        ]
    }

    #[test]
    fn order_is_canonical_and_independent_of_input_order() {
        let sorted = run(&[base()]);
        assert_eq!(
            names(&sorted),
            [
                "./",
                "./a/",
                "./a/sub/",
                "./a/sub/y",
                "./a/x",
                "./a.b",
                "./b/",
                "./b/z",
                "./c"
            ]
        );
        let mut scrambled = base();
        scrambled.reverse();
        scrambled.swap(1, 5);
        assert_eq!(run(&[scrambled]), sorted);
        // Names without "./" and with stray slashes mean the same tree.
        let plain: Vec<E> = base()
            .into_iter()
            .map(|mut e| {
                e.name = e.name.strip_prefix(b"./").unwrap_or(&e.name).to_vec();
                e
            })
            .collect();
        assert_eq!(run(&[plain]), sorted);
    }

    #[test]
    fn same_tree_gives_same_bytes_however_layered() {
        let mut flat = base();
        flat[2] = file("./a/x", "new").mode(0o600);
        let layered = run(&[base(), vec![dir("./a/"), file("./a/x", "new").mode(0o600)]]);
        assert_eq!(layered, run(&[flat]));
    }

    #[test]
    fn whiteout_removes_file_and_subtree() {
        let out = run(&[base(), vec![dir("./"), whiteout("./a"), whiteout("./c")]]);
        assert_eq!(names(&out), ["./", "./a.b", "./b/", "./b/z"]);
    }

    #[test]
    fn hard_links_to_a_whiteout_are_whiteouts() {
        // overlayfs shares one whiteout inode, so GNU tar links them.
        let layer = vec![dir("./"), whiteout("./a.b"), hardlink("./b", "./a.b")];
        assert_eq!(
            names(&run(&[base(), layer])),
            ["./", "./a/", "./a/sub/", "./a/sub/y", "./a/x", "./c"]
        );
    }

    #[test]
    fn whiteout_in_the_base_is_dropped() {
        let mut b = base();
        b.push(whiteout("./w"));
        assert_eq!(run(&[b]), run(&[base()]));
    }

    #[test]
    fn opaque_dir_hides_lower_children_and_strips_overlay_xattrs() {
        let cap = b"\x01\x00\x00\x02\x0a\x00 \x00\n=\x00\x00\xff";
        let layer = vec![
            dir("./"),
            dir("./a/")
                .opaque()
                .xattr("trusted.overlay.origin", b"\x00\xfb")
                .xattr("user.x", b"kept")
                .mode(0o700),
            file("./a/new", "n").xattr("security.capability", cap),
        ];
        let out = run(&[base(), layer]);
        assert_eq!(
            names(&out),
            ["./", "./a/", "./a/new", "./a.b", "./b/", "./b/z", "./c"]
        );
        let listed = list(&out);
        let a = find(&listed, "./a/");
        assert_eq!(a.mode, 0o700);
        assert_eq!(a.record("SCHILY.xattr.user.x"), Some(&b"kept"[..]));
        assert!(a
            .records
            .iter()
            .all(|(k, _)| !k.starts_with(b"SCHILY.xattr.trusted.overlay")));
        let new = find(&listed, "./a/new");
        assert_eq!(
            new.record("SCHILY.xattr.security.capability"),
            Some(&cap[..])
        );
    }

    #[test]
    fn non_dir_over_dir_hides_subtree() {
        let out = run(&[base(), vec![dir("./"), symlink("./a", "b")]]);
        assert_eq!(names(&out), ["./", "./a", "./a.b", "./b/", "./b/z", "./c"]);
        assert_eq!(find(&list(&out), "./a").link, b"b");
    }

    #[test]
    fn dir_over_non_dir_replaces_it() {
        let layer = vec![dir("./"), dir("./c/"), file("./c/in", "i")];
        let listed = list(&run(&[base(), layer]));
        assert_eq!(find(&listed, "./c/").flag, b'5');
        assert_eq!(find(&listed, "./c/in").data, b"i");
    }

    #[test]
    fn higher_metadata_wins() {
        let layer = vec![
            dir("./").mode(0o700),
            dir("./b/").mode(0o711).uid(1000),
            file("./a.b", "two").uid(7),
        ];
        let out = run(&[base(), layer]);
        let listed = list(&out);
        assert_eq!(find(&listed, "./").mode, 0o700);
        let b = find(&listed, "./b/");
        assert_eq!((b.mode, b.uid), (0o711, 1000));
        let ab = find(&listed, "./a.b");
        assert_eq!((ab.data.as_slice(), ab.uid), (&b"two"[..], 7));
        // The lower directory's children stay.
        assert_eq!(find(&listed, "./b/z").data, b"z");
    }

    fn linked() -> Vec<E> {
        let mut b = base();
        b.push(file("./m", "shared").mode(0o4755).uid(5));
        b.push(hardlink("./b/l", "./m"));
        b.push(hardlink("./a/l", "./m"));
        b
    }

    #[test]
    fn hard_link_group_intact_when_untouched() {
        let listed = list(&run(&[linked()]));
        // "./a/l" comes first, so it carries the data.
        let first = find(&listed, "./a/l");
        assert_eq!((first.flag, first.data.as_slice()), (b'0', &b"shared"[..]));
        assert_eq!((first.mode, first.uid), (0o4755, 5));
        for name in ["./b/l", "./m"] {
            let o = find(&listed, name);
            assert_eq!((o.flag, o.link.as_slice()), (b'1', &b"./a/l"[..]));
            assert_eq!((o.mode, o.uid, o.data.len()), (0o4755, 5, 0));
        }
    }

    #[test]
    fn overriding_a_links_data_entry_leaves_the_links_the_old_data() {
        let layer = vec![dir("./"), dir("./a/"), file("./a/l", "new")];
        let listed = list(&run(&[linked(), layer]));
        assert_eq!(find(&listed, "./a/l").data, b"new");
        let b = find(&listed, "./b/l");
        assert_eq!((b.flag, b.data.as_slice()), (b'0', &b"shared"[..]));
        let m = find(&listed, "./m");
        assert_eq!((m.flag, m.link.as_slice()), (b'1', &b"./b/l"[..]));
    }

    #[test]
    fn whited_out_link_leaves_the_rest() {
        let layer = vec![dir("./"), whiteout("./b"), whiteout("./a/l")];
        let listed = list(&run(&[linked(), layer]));
        let m = find(&listed, "./m");
        assert_eq!((m.flag, m.data.as_slice()), (b'0', &b"shared"[..]));
        assert!(listed.iter().all(|o| o.flag != b'1'));
    }

    #[test]
    fn link_to_missing_target_is_an_error() {
        let mut b = base();
        b.push(hardlink("./l", "./nowhere"));
        let err = try_run(&[b]).expect_err("missing target");
        assert!(matches!(err, MergeError::MissingLinkTarget { .. }), "{err}");
        // Nor may a layer link into the base.
        let err = try_run(&[base(), vec![hardlink("./l", "./a/x")]]).expect_err("cross-archive");
        assert!(err.to_string().contains("1.tar"), "{err}");
    }

    #[test]
    fn non_utf8_names_survive() {
        let mut b = base();
        b.push(entry(b'5', b"./caf\xe9/"));
        b.push(E {
            data: b"d".to_vec(),
            ..entry(b'0', b"./caf\xe9/na\xefve")
        });
        let long = [b"./b/".as_slice(), &[b'\xf1'; 150]].concat();
        b.push(entry(b'0', &long));
        let listed = list(&run(&[b]));
        assert!(listed.iter().any(|o| o.name == b"./caf\xe9/"));
        assert_eq!(
            listed
                .iter()
                .find(|o| o.name == b"./caf\xe9/na\xefve")
                .map(|o| &o.data[..]),
            Some(&b"d"[..])
        );
        assert!(listed.iter().any(|o| o.name == long));
    }

    #[test]
    fn truncated_or_garbage_archive_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t.tar");
        let whole = tar_bytes(&linked());
        // Everything before the end-of-archive blocks.
        let body = whole.len() - 1024;
        for cut in (0..body).step_by(37) {
            fs::write(&p, &whole[..cut]).expect("write");
            assert!(merge(&[&p], &mut Vec::new()).is_err(), "cut at {cut}");
        }
        let garbage: Vec<u8> = (0..10_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        fs::write(&p, &garbage).expect("write");
        assert!(merge(&[&p], &mut Vec::new()).is_err());
        // A valid header whose size runs past the end.
        let mut h = tar::Header::new_ustar();
        h.set_path("big").expect("path");
        h.set_size(1 << 40);
        h.set_cksum();
        let lying = [h.as_bytes().as_slice(), &[0; 2048]].concat();
        fs::write(&p, lying).expect("write");
        let err = merge(&[&p], &mut Vec::new()).expect_err("past the end");
        assert!(err.to_string().contains("past the end"), "{err}");
    }

    #[test]
    fn sparse_and_overlay_redirects_are_refused() {
        let mut b = base();
        b.push(E {
            pax: vec![("GNU.sparse.major".into(), b"1".to_vec())],
            ..file("./s", "")
        });
        let err = try_run(&[b]).expect_err("sparse");
        assert!(err.to_string().contains("sparse"), "{err}");
        let layer = vec![dir("./b/").xattr("trusted.overlay.redirect", b"/a")];
        let err = try_run(&[base(), layer]).expect_err("redirect");
        assert!(err.to_string().contains("redirect"), "{err}");
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for n in 0..1200 {
            let mut rec = Vec::new();
            push_record(&mut rec, b"k", &vec![b'v'; n]);
            let space = rec.iter().position(|&b| b == b' ').expect("space");
            let len: usize = std::str::from_utf8(&rec[..space])
                .expect("utf8")
                .parse()
                .expect("len");
            assert_eq!(len, rec.len(), "value of {n} bytes");
        }
    }

    #[test]
    fn gnu_tar_reads_the_output() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = run(&[linked(), vec![dir("./"), whiteout("./c")]]);
        let p = tmp.path().join("out.tar");
        fs::write(&p, &out).expect("write");
        let listing = Command::new("tar")
            .arg("--numeric-owner")
            .arg("-tvf")
            .arg(&p)
            .output()
            .expect("run GNU tar");
        let stdout = String::from_utf8_lossy(&listing.stdout);
        let stderr = String::from_utf8_lossy(&listing.stderr);
        // GNU tar before 1.35 doesn't know hdrcharset (libarchive does).
        let known = "tar: Ignoring unknown extended header keyword 'hdrcharset'";
        assert!(listing.status.success(), "{stderr}");
        assert!(stderr.lines().all(|l| l == known), "{stderr}");
        let names: Vec<&str> = stdout
            .lines()
            .map(|l| l.split_whitespace().nth(5).unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "./",
                "./a/",
                "./a/l",
                "./a/sub/",
                "./a/sub/y",
                "./a/x",
                "./a.b",
                "./b/",
                "./b/l",
                "./b/z",
                "./m"
            ]
        );
        assert!(stdout.contains("./b/l link to ./a/l"), "{stdout}");
        assert!(stdout.contains("-rwsr-xr-x 5/0"), "{stdout}");
    }
}
