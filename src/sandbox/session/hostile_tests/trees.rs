//! Directories copied out of (and into) a misbehaving guest: tar streams
//! made by hand, with members that reach out of the destination, broken
//! streams, and agents that end a stream early or twice. Whatever the
//! guest sends, nothing is written outside the destination, and a failed
//! copy leaves nothing beside it.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

const DIR: u8 = b'5';
const FILE: u8 = b'0';
const SYMLINK: u8 = b'2';
const HARDLINK: u8 = b'1';

/// One member of a hand-made ustar stream.
struct Member<'a> {
    name: &'a str,
    kind: u8,
    mode: u32,
    data: &'a [u8],
    link: &'a str,
}

fn member<'a>(name: &'a str, kind: u8, mode: u32) -> Member<'a> {
    Member {
        name,
        kind,
        mode,
        data: b"",
        link: "",
    }
}

fn file<'a>(name: &'a str, mode: u32, data: &'a [u8]) -> Member<'a> {
    Member {
        data,
        ..member(name, FILE, mode)
    }
}

fn link<'a>(name: &'a str, kind: u8, target: &'a str) -> Member<'a> {
    Member {
        link: target,
        ..member(name, kind, 0o777)
    }
}

/// A ustar stream of `members`, as a guest could send any.
fn ustar(members: &[Member]) -> Vec<u8> {
    fn octal(field: &mut [u8], value: u64) {
        let text = format!("{value:0width$o}\0", width = field.len() - 1);
        field.copy_from_slice(text.as_bytes());
    }
    let mut out = Vec::new();
    for m in members {
        let mut h = [0u8; 512];
        h[..m.name.len()].copy_from_slice(m.name.as_bytes());
        octal(&mut h[100..108], u64::from(m.mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], m.data.len() as u64);
        octal(&mut h[136..148], 1_700_000_000);
        h[148..156].copy_from_slice(b"        ");
        h[156] = m.kind;
        h[157..157 + m.link.len()].copy_from_slice(m.link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(m.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

/// The agent's side of a copy-out of a directory: the header, `stream` in
/// pieces, its end, then `Done`.
fn sends_tree(stream: Vec<u8>) -> impl FnOnce(&mut Agent, u32) + Send + 'static {
    move |a, id| {
        a.send(&Reply::TreeHeader { id });
        for chunk in stream.chunks(1000) {
            a.send(&data(id, chunk));
        }
        a.send(&data(id, b""));
        a.send(&Reply::Done { id });
    }
}

/// A copy-out of a directory to `<tempdir>/out`, against `agent`.
struct TreeCopy {
    dir: tempfile::TempDir,
    result: Result<()>,
}

impl TreeCopy {
    fn run(agent: impl FnOnce(&mut Agent, u32) + Send + 'static) -> TreeCopy {
        TreeCopy::into(tempfile::tempdir().expect("tempdir"), false, agent)
    }

    fn into(
        dir: tempfile::TempDir,
        keep_setuid: bool,
        agent: impl FnOnce(&mut Agent, u32) + Send + 'static,
    ) -> TreeCopy {
        let dest = dir.path().join("out");
        let result = against(
            WATCH_LIMIT,
            move |mut a: Agent| {
                let id = match a.request() {
                    Some(Request::GetFile { id, .. }) => id,
                    other => panic!("expected a get-file request, got {other:?}"),
                };
                agent(&mut a, id);
                a.hold();
            },
            move |s, w| s.get_file("/guest/tree", &dest, keep_setuid, w),
        );
        TreeCopy { dir, result }
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// The copy's error, and the names left beside the destination.
    fn error(&self) -> (String, Vec<String>) {
        let err = match &self.result {
            Ok(()) => panic!("the copy should fail"),
            Err(e) => format!("{e:#}"),
        };
        (err, names(self.dir.path()))
    }
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn a_tree_arrives_whole_without_its_special_bits() {
    let stream = ustar(&[
        member("./", DIR, 0o2755),
        member("./d/", DIR, 0o3775),
        file("./d/suid", 0o4755, b"program"),
        file("./d/plain", 0o640, b"data"),
        link("./hard", HARDLINK, "./d/suid"),
        link("./etc", SYMLINK, "/etc"),
        link("./up", SYMLINK, "../.."),
        link("./rel", SYMLINK, "d/plain"),
    ]);
    let copy = TreeCopy::run(sends_tree(stream.clone()));
    copy.result.as_ref().expect("copy out");
    let out = copy.out();
    assert_eq!(mode(&out), 0o755);
    assert_eq!(mode(&out.join("d")), 0o775);
    assert_eq!(mode(&out.join("d/suid")), 0o755);
    assert_eq!(mode(&out.join("d/plain")), 0o640);
    assert_eq!(fs::read(out.join("d/suid")).expect("read"), b"program");
    let (a, b) = (
        fs::metadata(out.join("d/suid")).expect("stat"),
        fs::metadata(out.join("hard")).expect("stat"),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    for (name, target) in [("etc", "/etc"), ("up", "../.."), ("rel", "d/plain")] {
        let p = out.join(name);
        assert!(fs::symlink_metadata(&p).expect("lstat").is_symlink());
        assert_eq!(fs::read_link(&p).expect("readlink"), Path::new(target));
    }
    // Nothing beside it: no staging directory left.
    assert_eq!(names(copy.dir.path()), ["out"]);

    // With --keep-setuid the bits stay.
    let copy = TreeCopy::into(
        tempfile::tempdir().expect("tempdir"),
        true,
        sends_tree(stream),
    );
    copy.result.as_ref().expect("copy out");
    assert_eq!(mode(&copy.out()), 0o2755);
    assert_eq!(mode(&copy.out().join("d")), 0o3775);
    assert_eq!(mode(&copy.out().join("d/suid")), 0o4755);
}

#[test]
fn members_reaching_out_of_the_tree_write_nothing_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    fs::write(outside.join("victim"), b"untouched").expect("write");
    let outside_s = outside.to_str().expect("utf8").to_string();
    let abs_name = format!("{outside_s}/absolute");
    let victim = format!("{outside_s}/victim");
    let stream = ustar(&[
        member("./", DIR, 0o755),
        // A symlink out, then a member through it.
        link("./esc", SYMLINK, &outside_s),
        file("./esc/through-link", 0o644, b"evil"),
        link("./root", SYMLINK, "/"),
        file(&format!("./root{outside_s}/through-root"), 0o644, b"evil"),
        link("./up", SYMLINK, ".."),
        file("./up/through-dotdot", 0o644, b"evil"),
        // Names that leave by themselves.
        file("../dotdot", 0o644, b"evil"),
        file(&abs_name, 0o644, b"evil"),
        // A hard link to a file outside, to write through.
        link("./hard", HARDLINK, &victim),
        file("./hard", 0o644, b"evil"),
    ]);
    let copy = TreeCopy::into(dir, false, sends_tree(stream));
    let out = copy.out();
    let (err, left) = copy.error();
    // tar complains, and kiln quotes it.
    assert!(err.contains("the host's tar failed"), "{err}");
    assert!(err.contains("Not a directory"), "{err}");
    assert_eq!(left, ["outside"]);
    assert!(!out.exists());
    assert_eq!(names(&outside), ["victim"]);
    assert_eq!(
        fs::read(outside.join("victim")).expect("read"),
        b"untouched"
    );
    let above = copy.dir.path().parent().expect("parent");
    assert!(!above.join("dotdot").exists());
}

#[test]
fn a_stream_that_is_not_tar_is_an_error_and_leaves_nothing() {
    let (err, left) = TreeCopy::run(sends_tree(vec![0x5A; 100_000])).error();
    assert!(err.contains("tar"), "{err}");
    assert!(
        err.contains("does not look like a tar archive") || err.contains("stopped reading"),
        "{err}"
    );
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn an_existing_destination_is_refused_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("out")).expect("mkdir");
    fs::write(dir.path().join("out/mine"), b"mine").expect("write");
    let stream = ustar(&[member("./", DIR, 0o755), file("./f", 0o644, b"x")]);
    let copy = TreeCopy::into(dir, false, sends_tree(stream));
    let out = copy.out();
    let (err, left) = copy.error();
    assert!(
        err.contains(&format!(
            "{} exists; kiln copies a guest directory to a new path",
            out.display()
        )),
        "{err}"
    );
    assert_eq!(left, ["out"]);
    assert_eq!(names(&out), ["mine"]);
    assert_eq!(fs::read(out.join("mine")).expect("read"), b"mine");
}

/// A stream that stops part-way, with a directory its owner cannot enter
/// already extracted: it is removed all the same.
fn half_a_tree() -> Vec<u8> {
    let mut stream = ustar(&[
        member("./", DIR, 0o755),
        member("./closed/", DIR, 0o000),
        file("./closed/f", 0o644, &[7; 5000]),
        member("./ro/", DIR, 0o500),
        file("./ro/f", 0o644, b"x"),
    ]);
    // Without the end-of-archive blocks.
    stream.truncate(stream.len() - 1024);
    stream
}

#[test]
fn a_failure_part_way_leaves_nothing() {
    let (err, left) = TreeCopy::run(|a, id| {
        a.send(&Reply::TreeHeader { id });
        a.send(&data(id, &half_a_tree()));
        a.send(&Reply::Failed {
            id: Some(id),
            message: "read error".into(),
        });
    })
    .error();
    assert!(err.contains("read error"), "{err}");
    assert!(left.is_empty(), "{left:?}");

    // The guest's tar failed after the whole stream.
    let (err, left) = TreeCopy::run(|a, id| {
        a.send(&Reply::TreeHeader { id });
        a.send(&data(id, &half_a_tree()));
        a.send(&data(id, b""));
        a.send(&Reply::Failed {
            id: Some(id),
            message: "tar failed on /guest/tree (exit status: 2): tar: ./x: Cannot open".into(),
        });
    })
    .error();
    assert!(err.contains("Cannot open"), "{err}");
    assert!(left.is_empty(), "{left:?}");

    let (err, left) = TreeCopy::run(|a, id| {
        a.send(&Reply::TreeHeader { id });
        a.send(&data(id, &half_a_tree()));
        a.stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    })
    .error();
    assert!(err.contains("lost the connection"), "{err}");
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_tree_ended_out_of_turn_is_refused() {
    let (err, left) = TreeCopy::run(|a, id| {
        a.send(&Reply::TreeHeader { id });
        a.send(&data(id, &half_a_tree()));
        a.send(&Reply::Done { id });
    })
    .error();
    assert!(
        err.contains("said /guest/tree was done before the end of its stream"),
        "{err}"
    );
    assert!(left.is_empty(), "{left:?}");

    for second in [
        Reply::TreeHeader { id: 0 },
        Reply::FileHeader {
            id: 0,
            mode: 0o644,
            size: 1,
        },
    ] {
        let (err, left) = TreeCopy::run(move |a, id| {
            a.send(&Reply::TreeHeader { id });
            a.send(&match second {
                Reply::TreeHeader { .. } => Reply::TreeHeader { id },
                _ => Reply::FileHeader {
                    id,
                    mode: 0o644,
                    size: 1,
                },
            });
        })
        .error();
        assert!(
            err.contains("sent a second header for /guest/tree"),
            "{err}"
        );
        assert!(left.is_empty(), "{left:?}");
    }
}

/// The stream `put_tree` sent, read as the agent would, and its answer.
fn put_tree(host: PathBuf, answer: impl FnOnce(&mut Agent, u32) + Send + 'static) -> Result<()> {
    against(
        WATCH_LIMIT,
        move |mut a: Agent| {
            let id = match a.request() {
                Some(Request::PutTree { id, path }) => {
                    assert_eq!(path, "/guest/tree");
                    id
                }
                other => panic!("expected a put-tree request, got {other:?}"),
            };
            answer(&mut a, id);
            a.hold();
        },
        move |s, w| s.put_tree(&host, "/guest/tree", w),
    )
}

#[test]
fn put_tree_sends_the_directory_as_tar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("sub")).expect("mkdir");
    fs::write(src.join("sub/f"), b"hello").expect("write");
    std::os::unix::fs::symlink("/etc", src.join("etc")).expect("symlink");
    let (tx, rx) = mpsc::channel();
    put_tree(src, move |a, id| {
        let mut stream = Vec::new();
        loop {
            match a.request() {
                Some(Request::FileData { id: i, data }) if i == id => {
                    if data.is_empty() {
                        break;
                    }
                    stream.extend(data);
                }
                other => panic!("expected file data, got {other:?}"),
            }
        }
        let _ = tx.send(stream);
        a.send(&Reply::Done { id });
    })
    .expect("put tree");
    let stream = rx.recv().expect("the stream");
    let into = dir.path().join("into");
    fs::create_dir(&into).expect("mkdir");
    let mut tar = std::process::Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&into)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    tar.stdin
        .take()
        .expect("stdin")
        .write_all(&stream)
        .expect("write");
    assert!(tar.wait().expect("wait").success());
    assert_eq!(fs::read(into.join("sub/f")).expect("read"), b"hello");
    assert_eq!(
        fs::read_link(into.join("etc")).expect("readlink"),
        Path::new("/etc")
    );
}

/// Reads the host's stream to its end.
fn drain(a: &mut Agent) {
    while let Some(Request::FileData { data, .. }) = a.request() {
        if data.is_empty() {
            break;
        }
    }
}

#[test]
fn put_tree_failures_are_named() {
    // The guest's tar gives up at once; the agent drops the rest of the
    // stream, as kiln's does.
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("f"), vec![1; 1 << 20]).expect("write");
    let err = put_tree(dir.path().to_path_buf(), |a, id| {
        a.send(&Reply::Failed {
            id: Some(id),
            message: "tar failed on /guest/tree: No space left on device".into(),
        });
        drain(a);
    })
    .expect_err("guest failure");
    let err = format!("{err:#}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("into the guest as /guest/tree"), "{err}");

    // The host's tar cannot read the directory.
    let missing = dir.path().join("missing");
    let err = put_tree(missing.clone(), |a, id| {
        drain(a);
        a.send(&Reply::Done { id });
    })
    .expect_err("host failure");
    let err = format!("{err:#}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("tar failed"), "{err}");
}
