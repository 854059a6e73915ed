//! `kiln cache ls` and `kiln cache gc` end to end: the real binary on a
//! cache of fake entries of every kind in a temp dir. No VM, no root; fast.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use rustix::fs::{flock, FlockOperation};
use serde_json::Value;

const DAY: u64 = 86400;

/// A cache in a temp dir, and kiln pointed at it.
struct Cache {
    dir: tempfile::TempDir,
    tmp: tempfile::TempDir,
}

impl Cache {
    fn new() -> Cache {
        Cache {
            dir: tempfile::tempdir().expect("tempdir"),
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn kiln(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_CACHE_DIR", self.root())
            .env("TMPDIR", self.tmp.path())
            .output()
            .expect("running kiln");
        assert!(
            out.status.success(),
            "kiln {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.kiln(args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kiln {args:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// An entry as kiln publishes one, holding `bytes` of data, last used
    /// `days_ago` (an entry without a use record counts from its mtime).
    fn entry(&self, kind: &str, key: &str, bytes: usize, days_ago: u64) -> PathBuf {
        let dir = self.root().join(kind);
        fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join(key);
        if kind == "initramfs" {
            fs::write(&path, vec![7u8; bytes]).expect("write");
        } else {
            fs::create_dir(&path).expect("mkdir");
            fs::write(path.join("data"), vec![7u8; bytes]).expect("write");
            fs::write(path.join("manifest.json"), "{}").expect("write");
        }
        // A build's lock file, as every built entry has.
        File::create(dir.join(format!(".{key}.lock"))).expect("lock file");
        age(&path, days_ago);
        path
    }

    /// The keys `kiln cache ls --json` lists.
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.json(&["cache", "ls", "--json"])["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["key"].as_str().expect("key").to_string())
            .collect();
        keys.sort();
        keys
    }
}

fn age(path: &Path, days_ago: u64) {
    File::open(path)
        .and_then(|f| f.set_modified(SystemTime::now() - Duration::from_secs(days_ago * DAY)))
        .expect("set mtime");
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The `key`s of a JSON list of entries, in order.
fn keys_of(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|e| e["key"].as_str().expect("key"))
        .collect()
}

/// Holds `path` locked with `op` from this process, as a running kiln would.
fn hold(path: &Path, op: FlockOperation) -> File {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("lock file");
    flock(&f, op).expect("flock");
    f
}

#[test]
fn ls_lists_every_kind_with_its_size_and_last_use() {
    let c = Cache::new();
    c.entry("kernel", "0123456789abcdef-6.1.0", 300_000, 2);
    c.entry("tools", "bookworm-fedcba9876543210", 500_000, 1);
    c.entry("initramfs", "00112233aabbccdd.cpio", 100_000, 0);
    c.entry("rootfs", "aabbccdd00112233", 200_000, 40);
    fs::write(c.root().join("kernel").join("last-build.log"), "log").expect("log");

    let v = c.json(&["cache", "ls", "--json"]);
    assert_eq!(v["root"], c.root().to_str().expect("utf-8 path"), "{v}");
    let entries = v["entries"].as_array().expect("entries");
    let mut kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().expect("kind"))
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["initramfs", "kernel", "rootfs", "tools"], "{v}");
    let mut total = 0;
    for e in entries {
        let size = e["size"].as_u64().expect("size");
        let path = PathBuf::from(e["path"].as_str().expect("path"));
        assert!(path.starts_with(c.root()), "{e}");
        assert_eq!(e["in_use"], false, "{e}");
        let (want_size, want_days) = match e["kind"].as_str() {
            Some("kernel") => (300_000, 2),
            Some("tools") => (500_000, 1),
            Some("initramfs") => (100_000, 0),
            _ => (200_000, 40),
        };
        // Allocated blocks: at least the data, not much more.
        assert!(
            size >= want_size && size < want_size + 64 * 1024,
            "{e}: {size}"
        );
        let last_used = e["last_used"].as_u64().expect("last_used");
        assert!(
            last_used.abs_diff(now() - want_days * DAY) < 120,
            "{e}: {last_used}"
        );
        total += size;
    }
    assert_eq!(v["total"].as_u64(), Some(total), "{v}");

    // The table, for people: the root, a line per entry, sizes in units.
    let out = c.kiln(&["cache", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("cache: {}\n", c.root().display())),
        "{text}"
    );
    assert!(text.contains("bookworm-fedcba9876543210"), "{text}");
    assert!(text.contains("40 days ago"), "{text}");
    assert!(text.contains("KiB"), "{text}");
    assert!(text.contains("in 4 entries"), "{text}");
}

#[test]
fn ls_of_an_empty_cache_says_where_it_is() {
    let c = Cache::new();
    let v = c.json(&["cache", "ls", "--json"]);
    assert_eq!(v["entries"], serde_json::json!([]));
    assert_eq!(v["total"], 0);
    let out = c.kiln(&["cache", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&c.root().display().to_string()), "{text}");
}

#[test]
fn gc_keep_removes_the_least_recently_used_first() {
    let c = Cache::new();
    c.entry("rootfs", "r", 400_000, 9);
    c.entry("tools", "t", 400_000, 6);
    c.entry("kernel", "k", 400_000, 3);
    c.entry("initramfs", "i.cpio", 400_000, 1);

    // 1 MiB left: the two least recently used go.
    let dry = c.json(&["cache", "gc", "--keep", "1M", "--dry-run", "--json"]);
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(keys_of(&dry["removed"]), ["r", "t"], "{dry}");
    assert_eq!(c.keys(), ["i.cpio", "k", "r", "t"], "a dry run removed");

    let v = c.json(&["cache", "gc", "--keep", "1M", "--json"]);
    assert_eq!(v["dry_run"], false, "{v}");
    assert_eq!(keys_of(&v["removed"]), ["r", "t"], "{v}");
    assert_eq!(v["in_use"], serde_json::json!([]), "{v}");
    assert_eq!(v["leftovers"], serde_json::json!([]), "{v}");
    assert!(v["total"].as_u64().expect("total") <= 1 << 20, "{v}");
    assert!(v["freed"].as_u64().expect("freed") >= 800_000, "{v}");
    assert_eq!(v["root"], c.root().to_str().expect("utf-8 path"), "{v}");
    for e in v["removed"].as_array().expect("removed") {
        for field in ["kind", "key", "path", "size", "last_used", "in_use"] {
            assert!(e.get(field).is_some(), "no {field} in {e}");
        }
    }
    assert_eq!(c.keys(), ["i.cpio", "k"]);
    // Gone with their lock files, and nothing staged left.
    let mut names: Vec<String> = ["rootfs", "tools"]
        .iter()
        .flat_map(|k| fs::read_dir(c.root().join(k)).expect("readdir").flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, Vec::<String>::new());
}

#[test]
fn gc_older_than_removes_what_was_not_used_since_and_is_the_default() {
    let c = Cache::new();
    c.entry("kernel", "old", 10_000, 45);
    c.entry("kernel", "recent", 10_000, 10);
    c.entry("tools", "older", 10_000, 20);
    let v = c.json(&["cache", "gc", "--older-than", "15", "--json"]);
    assert_eq!(keys_of(&v["removed"]), ["old", "older"], "{v}");
    assert_eq!(c.keys(), ["recent"]);

    // With neither flag: what was unused for 30 days.
    let c = Cache::new();
    c.entry("kernel", "old", 10_000, 45);
    c.entry("kernel", "recent", 10_000, 10);
    let out = c.kiln(&["cache", "gc"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("removed kernel old"), "{text}");
    assert!(text.contains("freed"), "{text}");
    assert_eq!(c.keys(), ["recent"]);
}

#[test]
fn gc_keeps_entries_a_kiln_uses_or_builds() {
    let c = Cache::new();
    let used = c.entry("kernel", "used", 10_000, 50);
    let built = c.entry("tools", "rebuilding", 10_000, 50);
    c.entry("rootfs", "idle", 10_000, 50);
    // A kiln running a VM on the kernel (and recording its use long ago),
    // and another rebuilding the tools image with --force.
    let use_lock = c.root().join("kernel").join(".used.use");
    let user = hold(&use_lock, FlockOperation::LockShared);
    age(&use_lock, 50);
    let builder = hold(
        &c.root().join("tools").join(".rebuilding.lock"),
        FlockOperation::LockExclusive,
    );

    let ls = c.json(&["cache", "ls", "--json"]);
    let in_use: Vec<&str> = ls["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["in_use"] == true)
        .map(|e| e["key"].as_str().expect("key"))
        .collect();
    assert_eq!(in_use, ["used"], "{ls}");

    let v = c.json(&["cache", "gc", "--keep", "0", "--json"]);
    assert_eq!(keys_of(&v["removed"]), ["idle"], "{v}");
    let mut kept = keys_of(&v["in_use"]);
    kept.sort();
    assert_eq!(kept, ["rebuilding", "used"], "{v}");
    assert!(used.join("data").is_file() && built.join("data").is_file());
    let out = c.kiln(&["cache", "gc", "--keep", "0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kept kernel used: in use by a running kiln"),
        "{text}"
    );

    drop((user, builder));
    let v = c.json(&["cache", "gc", "--keep", "0", "--json"]);
    let mut removed = keys_of(&v["removed"]);
    removed.sort();
    assert_eq!(removed, ["rebuilding", "used"], "{v}");
    assert_eq!(c.keys(), Vec::<String>::new());
}

#[test]
fn gc_removes_the_leftovers_of_dead_builds_only() {
    let c = Cache::new();
    let kept = c.entry("kernel", "k", 10_000, 1);
    // A build killed outright: its staging directory, with the lock file
    // no process holds any more.
    let dead = c.root().join("kernel").join(".k2.partial-dead01");
    fs::create_dir(&dead).expect("mkdir");
    fs::write(dead.join("owner.lock"), "").expect("lock file");
    fs::write(dead.join("vmlinux"), vec![1u8; 200_000]).expect("write");
    // A build under way: its owner holds the lock.
    let live = c.root().join("tools").join(".t.partial-live01");
    fs::create_dir_all(&live).expect("mkdir");
    let owner = hold(&live.join("owner.lock"), FlockOperation::LockExclusive);

    let dry = c.json(&["cache", "gc", "--dry-run", "--json"]);
    assert_eq!(dry["leftovers"].as_array().map(Vec::len), Some(1), "{dry}");
    assert!(dead.is_dir(), "a dry run removed");

    let v = c.json(&["cache", "gc", "--json"]);
    let leftovers = v["leftovers"].as_array().expect("leftovers");
    assert_eq!(leftovers.len(), 1, "{v}");
    assert_eq!(leftovers[0]["path"], dead.to_str().expect("utf-8 path"));
    assert!(
        leftovers[0]["size"].as_u64().expect("size") >= 200_000,
        "{v}"
    );
    assert_eq!(v["removed"], serde_json::json!([]), "{v}");
    assert!(!dead.exists(), "a dead build's staging was kept");
    assert!(live.is_dir(), "a live build's staging was removed");
    assert!(kept.is_dir());
    drop(owner);
}

#[test]
fn gc_refuses_a_size_it_cannot_read() {
    let c = Cache::new();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["cache", "gc", "--keep", "10GB"])
        .env("KILN_CACHE_DIR", c.root())
        .output()
        .expect("running kiln");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected a size such as 10G"), "{err}");
}
