//! Writing a new file so that its runs of zeroes become holes, as `cp
//! --sparse=always` does: a disk image copied out of a guest arrives as a
//! byte stream, and would otherwise take its whole size on the host. And
//! reading one without reading its holes.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

/// Gives `f` every byte of `file` in order, in pieces of at most 1 MiB;
/// its holes as zeroes from memory, never read: the kernel would fill a
/// page of its cache with zeroes for each, and a 2 GiB disk image with
/// 600 MiB of data took three times as long to hash that way.
pub fn read_with_holes(file: &File, mut f: impl FnMut(&[u8])) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let len = file.metadata()?.len();
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0;
    let pieces = |mut n: u64, f: &mut dyn FnMut(usize)| {
        while n > 0 {
            let k = n.min(CHUNK as u64) as usize;
            f(k);
            n -= k as u64;
        }
    };
    while pos < len {
        // Where data starts again: the end when there is none (ENXIO); a
        // filesystem that cannot tell holes has data everywhere.
        let data = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d.min(len),
            Err(rustix::io::Errno::NXIO) => len,
            Err(_) => pos,
        };
        pieces(data - pos, &mut |k| f(&zeros[..k]));
        if data >= len {
            break;
        }
        let hole = match rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(data)) {
            // Always past `data`: a filesystem that says otherwise is read
            // to the end.
            Ok(h) if h > data => h.min(len),
            _ => len,
        };
        let mut at = data;
        while at < hole {
            let k = (hole - at).min(CHUNK as u64) as usize;
            file.read_exact_at(&mut buf[..k], at)?;
            f(&buf[..k]);
            at += k as u64;
        }
        pos = hole;
    }
    Ok(())
}

/// The granularity of holes: a filesystem block on the filesystems kiln
/// writes to. A zero run that does not cover a whole aligned block is
/// skipped too; that block is allocated when its other bytes are written.
const BLOCK: u64 = 4096;

/// Writes a new, empty file from its start; zero blocks are seeked over.
pub struct SparseWriter<'a> {
    file: &'a File,
    at: u64,
}

impl<'a> SparseWriter<'a> {
    pub fn new(file: &'a File) -> SparseWriter<'a> {
        SparseWriter { file, at: 0 }
    }

    pub fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            // Up to the next block boundary of the file.
            let room = BLOCK - self.at % BLOCK;
            let n = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let (piece, rest) = data.split_at(n);
            if piece.iter().all(|b| *b == 0) {
                self.file.seek(SeekFrom::Current(n as i64))?;
            } else {
                self.file.write_all(piece)?;
            }
            self.at += n as u64;
            data = rest;
        }
        Ok(())
    }

    /// Gives the file its length: trailing zeroes were only seeked over.
    pub fn finish(self) -> io::Result<()> {
        self.file.set_len(self.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_file_with_holes_reads_as_its_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = File::create(&path).expect("create");
        let mut w = SparseWriter::new(&file);
        let mut expected = [vec![7u8; 5000], vec![0; 3 << 20], b"tail".to_vec()].concat();
        w.write_all(&expected).expect("write");
        // Trailing zeroes: a hole at the end.
        w.write_all(&vec![0; 70_000]).expect("write");
        expected.extend(vec![0; 70_000]);
        w.finish().expect("finish");
        let mut got = Vec::new();
        read_with_holes(&File::open(&path).expect("open"), |b| {
            assert!(b.len() <= 1 << 20);
            got.extend_from_slice(b)
        })
        .expect("read");
        assert!(got == expected, "the bytes differ");
        let empty = dir.path().join("empty");
        File::create(&empty).expect("create");
        read_with_holes(&File::open(&empty).expect("open"), |_| panic!("no bytes")).expect("read");
    }

    #[test]
    fn zero_blocks_become_holes_and_the_bytes_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = File::create(&path).expect("create");
        let mut expected = Vec::new();
        let mut w = SparseWriter::new(&file);
        // Unaligned chunks: data, 1 MiB of zeroes in odd pieces, data
        // straddling a block boundary, trailing zeroes.
        let chunks: Vec<Vec<u8>> = vec![
            b"head".to_vec(),
            vec![0; 300_000],
            vec![0; 748_572],
            [vec![0; 4000], b"middle".to_vec(), vec![0; 100]].concat(),
            vec![0; 2 << 20],
        ];
        for c in &chunks {
            w.write_all(c).expect("write");
            expected.extend_from_slice(c);
        }
        w.finish().expect("finish");
        drop(file);
        let mut back = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut back))
            .expect("read");
        assert_eq!(back.len(), expected.len());
        assert!(back == expected, "the bytes differ");
        let meta = std::fs::metadata(&path).expect("stat");
        assert!(
            meta.blocks() * 512 <= 64 * 1024,
            "{} bytes allocated for {} of mostly zeroes",
            meta.blocks() * 512,
            meta.len()
        );
    }

    #[test]
    fn an_empty_file_stays_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = File::create(&path).expect("create");
        let mut w = SparseWriter::new(&file);
        w.write_all(&[]).expect("write");
        w.finish().expect("finish");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
    }
}
