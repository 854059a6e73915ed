//! `kiln build` and `kiln boot` end to end: the real binary, the real
//! kernel and tools image, real QEMU (TCG here), real mkfs and grub. Images
//! are inspected from the host without root (sgdisk, debugfs, mtools,
//! qemu-img), and booted as whole machines under OVMF and SeaBIOS.

#[path = "support/examples.rs"]
mod examples;
#[path = "support/leftovers.rs"]
mod leftovers;
#[path = "support/tmux.rs"]
mod tmux;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use examples::copy_example;
use kiln_agent::poll::poll_until;
use leftovers::{mounts_and_loop_devices_mentioning, processes_left_after, processes_mentioning};
use rustix::process::{geteuid, kill_process, Pid, Signal};
use tmux::Tmux;

/// The kiln binary under test: cargo's, or the one `KILN_TEST_KILN` names
/// (the unprivileged CI run, whose user may not reach cargo's).
fn kiln_exe() -> PathBuf {
    std::env::var_os("KILN_TEST_KILN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kiln")))
}

fn kiln(dir: &Path, args: &[&str]) -> Output {
    kiln_with_stdin(dir, args, b"")
}

/// `kiln ARGS` in `dir`, given `stdin`; checks it left no runtime files.
fn kiln_with_stdin(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    kiln_with_env(dir, args, stdin, &[])
}

/// `kiln ARGS` in `dir`, given `stdin` and `env`; checks it left no
/// runtime files.
fn kiln_with_env(dir: &Path, args: &[&str], stdin: &[u8], env: &[(&str, &Path)]) -> Output {
    let runtime = dir.join("runtime");
    fs::create_dir_all(&runtime).expect("runtime dir");
    let mut child = Command::new(kiln_exe())
        .args(args)
        .envs(env.iter().copied())
        .env("TMPDIR", &runtime)
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir(dir)
        .spawn()
        .expect("run kiln");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait for kiln");
    let left: Vec<_> = fs::read_dir(&runtime)
        .expect("read runtime")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "kiln left runtime files behind: {left:?}");
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn host(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn sha256_of(p: &Path) -> String {
    host("sha256sum", &[p.to_str().expect("utf-8 path")])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A tiny root: busybox (static) and the files chown and chroot need.
fn busybox_root(dir: &Path) -> PathBuf {
    let root = dir.join("rootdir");
    fs::create_dir_all(root.join("bin")).expect("mkdir");
    fs::create_dir_all(root.join("etc")).expect("mkdir");
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    for applet in ["sh", "chown", "true", "false", "ls", "cat", "echo"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    root
}

const SMALL: &str = r#"
name = "small"
size = "64M"
source_date_epoch = 1700000000
commands = ["echo built-in-chroot > /etc/built", "ln /etc/built /etc/built-link", "touch /etc/naïve \"/etc/$(printf 'x\\351y')\""]

[[partition]]
label = "ESP"
size = "16M"
type = "esp"
filesystem = "vfat"
mount = "/boot/efi"

[[partition]]
label = "root"
size = "rest"
type = "linux"
filesystem = "ext4"
mount = "/"

[root]
directory = "rootdir"

[system]
hostname = "tiny"

[[file]]
path = "/etc/motd"
content = "hello from kiln\n"
mode = "0640"

[[file]]
path = "/boot/efi/hello.txt"
source = "hello.txt"
"#;

/// SMALL's commands line, which some tests replace.
const SMALL_COMMANDS: &str = r#"commands = ["echo built-in-chroot > /etc/built", "ln /etc/built /etc/built-link", "touch /etc/naïve \"/etc/$(printf 'x\\351y')\""]"#;

fn small_recipe(dir: &Path, text: &str) -> PathBuf {
    assert!(
        SMALL.contains(SMALL_COMMANDS),
        "SMALL_COMMANDS is not SMALL's line"
    );
    busybox_root(dir);
    fs::write(dir.join("hello.txt"), "on the esp\n").expect("write");
    let p = dir.join("small.toml");
    fs::write(&p, text).expect("write recipe");
    p
}

/// The small recipe with `commands` (a TOML array) for its commands.
fn small_recipe_with_commands(dir: &Path, commands: &str) -> PathBuf {
    small_recipe(
        dir,
        &SMALL.replace(SMALL_COMMANDS, &format!("commands = {commands}")),
    )
}

const ROOT_OFFSET: u64 = 17 << 20;

#[test]
fn small_image_in_every_format_is_inspectable_and_reproducible() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_recipe(dir, SMALL);
    let out = kiln(
        dir,
        &[
            "build",
            "small.toml",
            "-o",
            "out",
            "--json",
            "--format",
            "raw",
            "--format",
            "qcow2",
            "--format",
            "vmdk",
            "--format",
            "vhdx",
            "--format",
            "vpc",
            "--format",
            "ova",
        ],
    );
    assert!(out.status.success(), "build failed: {}", text(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--json prints one JSON document");
    let outputs = summary["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 6, "{summary}");
    let steps: Vec<&str> = summary["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["step"].as_str())
        .collect();
    for want in [
        "root filesystem",
        "root tree",
        "mount root",
        "command 1",
        "partition",
        "filesystems",
        "ext4 filesystems",
    ] {
        assert!(steps.contains(&want), "no step {want} in {steps:?}");
    }
    let out_dir = dir.join("out");
    assert_eq!(
        files_in(&out_dir),
        [
            "small.ova",
            "small.ova.sha256",
            "small.qcow2",
            "small.qcow2.sha256",
            "small.raw",
            "small.raw.sha256",
            "small.vhd",
            "small.vhd.sha256",
            "small.vhdx",
            "small.vhdx.sha256",
            "small.vmdk",
            "small.vmdk.sha256"
        ]
    );
    // Every reported hash is the file's, and the .sha256 file says so too.
    for o in outputs {
        let path = PathBuf::from(o["path"].as_str().expect("path"));
        let sum = sha256_of(&path);
        assert_eq!(o["sha256"].as_str(), Some(sum.as_str()));
        let line = fs::read_to_string(format!("{}.sha256", path.display())).expect("sha file");
        assert!(line.starts_with(&sum), "{line}");
    }

    // qemu-img reads every format back with the disk's size and finds no
    // errors.
    for (file, fmt) in [
        ("small.raw", "raw"),
        ("small.qcow2", "qcow2"),
        ("small.vmdk", "vmdk"),
        ("small.vhdx", "vhdx"),
        ("small.vhd", "vpc"),
    ] {
        let p = out_dir.join(file);
        let info: serde_json::Value = serde_json::from_str(&host(
            "qemu-img",
            // A fixed VHD is raw data with a footer: qemu-img is told
            // the format rather than guessing it.
            &[
                "info",
                "-f",
                fmt,
                "--output=json",
                p.to_str().expect("path"),
            ],
        ))
        .expect("qemu-img json");
        assert_eq!(info["format"], fmt, "{file}: {info}");
        assert_eq!(info["virtual-size"], 64 << 20, "{file}: {info}");
        if matches!(fmt, "qcow2" | "vmdk" | "vhdx") {
            host("qemu-img", &["check", p.to_str().expect("path")]);
        }
        // The converted image holds the same disk.
        host(
            "qemu-img",
            &[
                "compare",
                "-f",
                fmt,
                "-F",
                "raw",
                p.to_str().expect("path"),
                out_dir.join("small.raw").to_str().expect("path"),
            ],
        );
    }

    // The ova: descriptor first, then the manifest, then the disk, with
    // digests that match and an OVF that names the disk.
    let ova = out_dir.join("small.ova");
    let listing = host("tar", &["tf", ova.to_str().expect("path")]);
    assert_eq!(
        listing.lines().collect::<Vec<_>>(),
        ["small.ovf", "small.mf", "small-disk1.vmdk"]
    );
    let unpacked = dir.join("ova");
    fs::create_dir_all(&unpacked).expect("mkdir");
    host(
        "tar",
        &[
            "xf",
            ova.to_str().expect("path"),
            "-C",
            unpacked.to_str().expect("path"),
        ],
    );
    let ovf = fs::read_to_string(unpacked.join("small.ovf")).expect("ovf");
    assert!(ovf.contains("ovf:href=\"small-disk1.vmdk\""), "{ovf}");
    assert!(
        ovf.contains(&format!("ovf:capacity=\"{}\"", 64u64 << 20)),
        "{ovf}"
    );
    assert!(ovf.contains("vmdk.html#streamOptimized"), "{ovf}");
    let mf = fs::read_to_string(unpacked.join("small.mf")).expect("mf");
    for f in ["small.ovf", "small-disk1.vmdk"] {
        let want = format!("SHA256({f})= {}", sha256_of(&unpacked.join(f)));
        assert!(mf.contains(&want), "{mf} lacks {want}");
    }
    let vmdk_info = host(
        "qemu-img",
        &[
            "info",
            unpacked.join("small-disk1.vmdk").to_str().expect("path"),
        ],
    );
    assert!(vmdk_info.contains("streamOptimized"), "{vmdk_info}");

    // The raw image from the host, without root: the partition table...
    let raw = out_dir.join("small.raw");
    let raw_s = raw.to_str().expect("path");
    let table = host("sgdisk", &["-p", raw_s]);
    assert!(table.contains("EF00") && table.contains("ESP"), "{table}");
    assert!(table.contains("8304") && table.contains("root"), "{table}");
    // ...the root filesystem...
    let ext4 = format!("{raw_s}?offset={ROOT_OFFSET}");
    let cat = |path: &str| host("debugfs", &["-R", &format!("cat {path}"), &ext4]);
    assert_eq!(cat("/etc/motd"), "hello from kiln\n");
    assert_eq!(cat("/etc/hostname"), "tiny\n");
    assert_eq!(cat("/etc/built"), "built-in-chroot\n");
    let fstab = cat("/etc/fstab");
    assert!(
        fstab.contains(" /boot/efi vfat ") && fstab.contains(" / ext4 "),
        "{fstab}"
    );
    let stat = host("debugfs", &["-R", "stat /etc/motd", &ext4]);
    assert!(stat.contains("Mode:  0640"), "{stat}");
    assert!(stat.contains("User:     0"), "{stat}");
    // A hard link stays one inode with two names (the host's mke2fs reads
    // the tree as a tar, where the second name is a link entry).
    let inode = |path: &str| {
        let stat = host("debugfs", &["-R", &format!("stat {path}"), &ext4]);
        assert!(stat.contains("Links: 2"), "{path}: {stat}");
        // "Inode: 14   Type: regular ..."
        let number = stat.split_whitespace().nth(1).map(str::to_string);
        assert!(stat.starts_with("Inode: ") && number.is_some(), "{stat}");
        number
    };
    assert_eq!(inode("/etc/built"), inode("/etc/built-link"));
    // Names are bytes: UTF-8 or not, each arrives as it was (debugfs
    // escapes the bytes it prints).
    let etc = host("debugfs", &["-R", "ls /etc", &ext4]);
    assert!(etc.contains(r"na\xc3\xafve"), "{etc}");
    assert!(etc.contains(r"x\xe9y"), "{etc}");
    // ...and the ESP, cut out of the root's tree.
    let esp = format!("{raw_s}@@1M");
    let hello = host("mtype", &["-i", &esp, "::/hello.txt"]);
    assert_eq!(hello, "on the esp\n");
    let root_ls = host("debugfs", &["-R", "ls /boot/efi", &ext4]);
    assert!(!root_ls.contains("hello.txt"), "{root_ls}");

    // The same recipe again gives the same raw image, byte for byte.
    let again = kiln(
        dir,
        &["build", "small.toml", "-o", "again", "--format", "raw"],
    );
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(sha256_of(&raw), sha256_of(&dir.join("again/small.raw")));

    // A changed recipe as a qcow2 overlay on that image: it names its
    // backing file and reads back as the changed disk.
    let layered = SMALL.replace("hostname = \"tiny\"", "hostname = \"layered\"")
        + "\n[output]\nqcow2_backing = \"again/small.raw\"\n";
    assert!(layered.contains("layered"));
    fs::write(dir.join("layered.toml"), layered).expect("write recipe");
    let out = kiln(
        dir,
        &[
            "build",
            "layered.toml",
            "-o",
            "layered",
            "--format",
            "qcow2",
            "--format",
            "raw",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let qcow2 = dir.join("layered/small.qcow2");
    let qcow2_s = qcow2.to_str().expect("path");
    let info = host("qemu-img", &["info", "-f", "qcow2", qcow2_s]);
    let base = dir.join("again/small.raw").canonicalize().expect("base");
    assert!(
        info.contains(&format!("backing file: {}", base.display()))
            && info.contains("backing file format: raw"),
        "{info}"
    );
    let layered_raw = dir.join("layered/small.raw");
    host(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            qcow2_s,
            layered_raw.to_str().expect("path"),
        ],
    );
    let ext4 = format!("{}?offset={ROOT_OFFSET}", layered_raw.display());
    assert_eq!(
        host("debugfs", &["-R", "cat /etc/hostname", &ext4]),
        "layered\n"
    );
    // Disk ids come from the recipe's name and layout, not its text: the
    // changed hostname leaves the partition table as it was.
    let first_mib = |p: &Path| {
        let mut b = fs::read(p).expect("raw");
        b.truncate(1 << 20);
        b
    };
    assert!(
        first_mib(&layered_raw) == first_mib(&dir.join("again/small.raw")),
        "the partition table changed with the hostname"
    );
    // It holds only the clusters that differ from its backing file (about
    // 128 KiB: the root's metadata and the hostname), not every allocated
    // cluster of the disk (2.7 MiB, what `qemu-img convert -B` wrote).
    let own = qcow2_own_data(&qcow2);
    let full = fs::metadata(out_dir.join("small.qcow2"))
        .expect("qcow2")
        .len();
    assert!(
        own <= 256 << 10,
        "the overlay holds {own} bytes of data ({} KiB; the full qcow2 is {} KiB)",
        own >> 10,
        full >> 10
    );
    eprintln!(
        "qcow2_backing overlay: {} KiB of data, file {} KiB (full qcow2 {} KiB)",
        own >> 10,
        fs::metadata(&qcow2).expect("qcow2").len() >> 10,
        full >> 10
    );
    // Its chain is itself and the base, not the raw disk it was made from,
    // and it has the built disk's size.
    let chain: serde_json::Value = serde_json::from_str(&host(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--backing-chain",
            "-f",
            "qcow2",
            qcow2_s,
        ],
    ))
    .expect("qemu-img info's JSON");
    let names: Vec<_> = chain
        .as_array()
        .expect("a chain")
        .iter()
        .map(|i| i["filename"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, [qcow2_s, base.to_str().expect("path")], "{chain}");
    let raw_len = fs::metadata(&layered_raw).expect("raw").len();
    assert_eq!(chain[0]["virtual-size"], raw_len, "{chain}");

    // kiln boot opens the overlay and its base (as is and grown) and
    // leaves both as they were. SMALL boots nothing: a machine that runs
    // to the timeout (124) is one QEMU started, where a backing file it
    // could not open stops it at once (125).
    let before = (sha256_of(&qcow2), sha256_of(&base));
    for grown in [&[][..], &["--disk-size", "128M"][..]] {
        let mut args = vec!["boot", qcow2_s, "--firmware", "bios", "--timeout", "3"];
        args.extend(grown);
        let out = kiln(dir, &args);
        assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    }
    assert_eq!((sha256_of(&qcow2), sha256_of(&base)), before);
}

/// Bytes of data a qcow2 file holds itself, not through its backing file.
fn qcow2_own_data(qcow2: &Path) -> u64 {
    let map = host(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            qcow2.to_str().expect("path"),
        ],
    );
    let map: serde_json::Value = serde_json::from_str(&map).expect("qemu-img map's JSON");
    map.as_array()
        .expect("a list of extents")
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().expect("length"))
        .sum()
}

/// SMALL with a fresh Debian bootstrap for its root instead of a directory.
fn small_debian_recipe(dir: &Path) -> PathBuf {
    let text = SMALL.replace("size = \"64M\"", "size = \"512M\"").replace(
        "directory = \"rootdir\"",
        "suite = \"bookworm\"\nvariant = \"essential\"",
    );
    fs::write(dir.join("hello.txt"), "on the esp\n").expect("write");
    let p = dir.join("small-debian.toml");
    fs::write(&p, text).expect("write recipe");
    p
}

/// A fresh bootstrap (mmdebstrap: root mode as root, unshare mode as a
/// normal user, which is what users run) gives a Debian root whose files
/// belong to root inside the image, whoever built it.
#[test]
fn a_fresh_debian_bootstrap_builds_with_the_users_own_rights() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_debian_recipe(dir);
    let out = kiln(dir, &["build", "small-debian.toml", "-o", "out", "--fresh"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "build failed: {stderr}");
    assert!(stderr.contains("bootstrapping bookworm"), "{stderr}");
    let raw = dir.join("out/small.raw");
    let ext4 = format!("{}?offset={ROOT_OFFSET}", raw.display());
    let version = host("debugfs", &["-R", "cat /etc/debian_version", &ext4]);
    assert!(version.starts_with("12."), "{version}");
    assert_eq!(
        host("debugfs", &["-R", "cat /etc/built", &ext4]),
        "built-in-chroot\n"
    );
    // Owned by root in the image: uid 0, whoever ran kiln.
    let stat = host("debugfs", &["-R", "stat /etc/passwd", &ext4]);
    assert!(stat.contains("User:     0"), "{stat}");
    let stat = host("debugfs", &["-R", "stat /usr/bin/dpkg", &ext4]);
    assert!(stat.contains("User:     0"), "{stat}");
}

/// The package names in `lock`-style lines or an apt cache's file names
/// (`name_version_arch.deb`).
fn package_names<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    names
        .into_iter()
        .filter_map(|n| n.split(['_', ' ']).next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// The apt file names in the package cache at `cache` (one mirror).
fn cached_debs(cache: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for store in fs::read_dir(cache.join("debs")).expect("debs").flatten() {
        let index = store.path().join("index");
        if let Ok(text) = fs::read_to_string(&index) {
            names.extend(
                text.lines()
                    .filter_map(|l| l.split(' ').nth(1))
                    .map(str::to_string),
            );
        }
    }
    names
}

/// The packages a bootstrap in the cache at `cache` installed, by the
/// dpkg status in its root archive, and the archive's SHA-256.
fn bootstraps(cache: &Path) -> BTreeMap<PathBuf, (BTreeSet<String>, String)> {
    let mut found = BTreeMap::new();
    for e in fs::read_dir(cache.join("rootfs"))
        .expect("rootfs")
        .flatten()
    {
        let tar = e.path().join("root.tar");
        if !tar.is_file() {
            continue;
        }
        let status = host(
            "tar",
            &["-xOf", &tar.display().to_string(), "./var/lib/dpkg/status"],
        );
        let names = package_names(status.lines().filter_map(|l| l.strip_prefix("Package: ")));
        let sha = host("sha256sum", &[&tar.display().to_string()]);
        let sha = sha.split(' ').next().unwrap_or_default().to_string();
        found.insert(e.path(), (names, sha));
    }
    found
}

/// Downloaded packages are kept in the cache and offered to every later
/// bootstrap: adding one package to a recipe downloads only it and what it
/// newly pulls in, a fresh bootstrap of the same recipe downloads nothing,
/// and a warm cache gives the same root archive as a cold one. Each build
/// stops before its VM (its lock names a package no bootstrap has), so
/// only the host's bootstrap runs, in a cache of the test's own.
#[test]
fn adding_a_package_downloads_only_that_package() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let cache = dir.join("cache");
    small_debian_recipe(dir);
    let a = fs::read_to_string(dir.join("small-debian.toml"))
        .expect("recipe")
        .replace(SMALL_COMMANDS, "");
    fs::write(dir.join("a.toml"), &a).expect("write");
    let b = a.replace(
        "variant = \"essential\"",
        "variant = \"essential\"\npackages = [\"less\"]",
    );
    assert_ne!(a, b);
    fs::write(dir.join("b.toml"), &b).expect("write");
    for lock in ["a.lock", "b.lock"] {
        fs::write(dir.join(lock), "kiln-no-such-package 1 amd64\n").expect("lock");
    }
    let build = |recipe: &str, extra: &[&str]| {
        let mut args = vec!["build", recipe, "-o", "out", "--locked"];
        args.extend_from_slice(extra);
        let out = kiln_with_env(dir, &args, b"", &[("KILN_CACHE_DIR", &cache)]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{stderr}");
        assert!(
            stderr.contains("the bootstrap's packages differ from the lock"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("boot build VM"),
            "the VM started: {stderr}"
        );
        stderr
    };

    let first = build("a.toml", &[]);
    let after_a = cached_debs(&cache);
    let roots = bootstraps(&cache);
    assert_eq!(roots.len(), 1, "{roots:?}");
    let (a_root, (a_pkgs, a_sha)) = roots.into_iter().next().expect("one");
    // The packages went in and out of apt's cache folder: it is still
    // root's, as mmdebstrap makes it, whoever built the image.
    let listing = host(
        "tar",
        &[
            "--numeric-owner",
            "-tvf",
            &a_root.join("root.tar").display().to_string(),
            "./var/cache/apt/archives/",
        ],
    );
    let folder = listing.lines().next().unwrap_or_default();
    assert!(folder.starts_with("drwxr-xr-x 0/0 "), "{listing}");
    assert_eq!(package_names(after_a.iter().map(String::as_str)), a_pkgs);
    assert!(
        first.contains(&format!(
            "root: 0 packages from the package cache, {} downloaded",
            after_a.len()
        )),
        "{first}"
    );

    let second = build("b.toml", &[]);
    let after_b = cached_debs(&cache);
    let mut roots = bootstraps(&cache);
    roots.remove(&a_root);
    let (_, (b_pkgs, _)) = roots.into_iter().next().expect("b's bootstrap");
    let added: BTreeSet<String> = b_pkgs.difference(&a_pkgs).cloned().collect();
    assert!(added.contains("less"), "{added:?}");
    let downloaded: Vec<&String> = after_b.difference(&after_a).collect();
    assert_eq!(
        package_names(downloaded.iter().map(|s| s.as_str())),
        added,
        "b downloaded other packages than it adds to a"
    );
    assert!(
        second.contains(&format!(
            "root: {} packages from the package cache, {} downloaded",
            after_a.len(),
            downloaded.len()
        )),
        "{second}"
    );

    let third = build("a.toml", &["--fresh"]);
    assert!(
        third.contains(&format!(
            "root: {} packages from the package cache, 0 downloaded",
            after_a.len()
        )),
        "{} stored after a: {third}",
        after_a.len()
    );
    assert_eq!(
        bootstraps(&cache)[&a_root].1,
        a_sha,
        "a warm cache gave another root archive than a cold one"
    );
}

/// kiln's cache directory, as kiln reports it.
fn kiln_cache_root(dir: &Path) -> PathBuf {
    let out = kiln(dir, &["cache", "ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    PathBuf::from(v["root"].as_str().expect("root"))
}

/// Packages a command installs with apt in the build VM come from the
/// shared package cache, and what it downloads goes there: a later build
/// that installs one more package downloads only what that adds. The
/// downloaded files are in no image.
#[test]
fn commands_take_packages_from_the_cache_and_keep_what_they_download() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_debian_recipe(dir);
    let base = fs::read_to_string(dir.join("small-debian.toml"))
        .expect("recipe")
        .replace("variant = \"essential\"", "variant = \"apt\"");
    // Unique to this run: no earlier run's layer is reused for it.
    let token = dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let install = |packages: &str| {
        base.replace(
            SMALL_COMMANDS,
            &format!(
                r#"commands = [{{ run = "echo {token} > /etc/kiln-test; apt-get update -q && apt-get install -y -q --no-install-recommends {packages}", network = true }}]"#
            ),
        )
    };
    fs::write(dir.join("a.toml"), install("bc")).expect("write");
    fs::write(dir.join("b.toml"), install("bc pv")).expect("write");
    let cache = kiln_cache_root(dir);
    let build = |recipe: &str, out: &str| {
        let o = kiln(
            dir,
            &["build", recipe, "-o", out, "--json", "--format", "raw"],
        );
        assert!(o.status.success(), "build failed: {}", text(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let downloaded: BTreeSet<String> = v["command_debs"]["downloaded"]
            .as_array()
            .expect("command_debs")
            .iter()
            .filter_map(|n| n.as_str())
            .map(str::to_string)
            .collect();
        let manifest = fs::read_to_string(dir.join(out).join("small.packages")).expect("manifest");
        (downloaded, package_names(manifest.lines()))
    };
    let has = |names: &BTreeSet<String>, package: &str| {
        names.iter().any(|n| n.starts_with(&format!("{package}_")))
    };

    let before = cached_debs(&cache);
    let (a_downloaded, a_packages) = build("a.toml", "a");
    assert!(a_packages.contains("bc"), "{a_packages:?}");
    if !has(&before, "bc") {
        assert!(has(&a_downloaded, "bc"), "{a_downloaded:?}");
    }
    assert!(has(&cached_debs(&cache), "bc"), "bc was not kept");

    let (b_downloaded, b_packages) = build("b.toml", "b");
    assert!(b_packages.contains("pv"), "{b_packages:?}");
    // Only what b adds to a, if anything: never bc again.
    let added: BTreeSet<String> = b_packages.difference(&a_packages).cloned().collect();
    assert!(
        package_names(b_downloaded.iter().map(String::as_str)).is_subset(&added),
        "b downloaded {b_downloaded:?}, beyond what it adds: {added:?}"
    );
    assert!(has(&cached_debs(&cache), "pv"), "pv was not kept");
    let ext4 = format!("{}?offset={ROOT_OFFSET}", dir.join("b/small.raw").display());
    let archives = host("debugfs", &["-R", "ls /var/cache/apt/archives", &ext4]);
    assert!(!archives.contains(".deb"), "{archives}");
}

/// `lock` with the version of `package` replaced by another.
fn edit_lock(lock: &str, package: &str) -> String {
    lock.lines()
        .map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [name, version, arch] if name == package => format!("{name} {version}.1 {arch}\n"),
            _ => format!("{l}\n"),
        })
        .collect()
}

/// A Debian build lists its packages in NAME.packages and writes
/// RECIPE.lock; `--locked` builds against that lock, and refuses, writing
/// nothing, once a version in it differs: after the VM's commands when
/// the recipe has some, before the build VM starts when it has none.
#[test]
fn a_debian_build_lists_its_packages_and_locked_refuses_other_versions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_debian_recipe(dir);
    let build = |out: &str, extra: &[&str]| {
        let mut args = vec!["build", "small-debian.toml", "-o", out, "--format", "raw"];
        args.extend_from_slice(extra);
        kiln(dir, &args)
    };
    let one = build("one", &[]);
    let stderr = text(&one.stderr);
    assert!(one.status.success(), "build failed: {stderr}");
    assert!(stderr.contains("lock: wrote"), "{stderr}");
    assert_eq!(
        files_in(&dir.join("one")),
        ["small.packages", "small.raw", "small.raw.sha256"]
    );
    let manifest = fs::read_to_string(dir.join("one/small.packages")).expect("manifest");
    let base_files = manifest
        .lines()
        .find(|l| l.starts_with("base-files "))
        .unwrap_or_else(|| panic!("no base-files in:\n{manifest}"));
    let words: Vec<&str> = base_files.split_whitespace().collect();
    assert_eq!(words.len(), 3, "{base_files}");
    assert!(words[1].starts_with("12."), "{base_files}");
    assert_eq!(words[2], "amd64");
    let names: Vec<&str> = manifest
        .lines()
        .map(|l| l.split(' ').next().unwrap_or_default())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "sorted by name");
    assert!(names.contains(&"dpkg"), "{manifest}");
    let lock = fs::read_to_string(dir.join("small-debian.lock")).expect("lock");
    let listed: String = lock
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(listed, manifest, "the lock lists what the manifest does");

    // The same packages: it builds, and the lock stays as it was.
    let two = build("two", &["--locked"]);
    assert!(
        two.status.success(),
        "--locked failed: {}",
        text(&two.stderr)
    );
    assert_eq!(
        fs::read_to_string(dir.join("two/small.packages")).expect("manifest"),
        manifest
    );
    assert_eq!(
        fs::read_to_string(dir.join("small-debian.lock")).expect("lock"),
        lock
    );

    // Another version of base-files in the lock, as after the mirror moved.
    let edited = edit_lock(&lock, "base-files");
    fs::write(dir.join("small-debian.lock"), &edited).expect("edit lock");
    let three = build("three", &["--locked"]);
    let stderr = text(&three.stderr);
    assert_eq!(three.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("~ base-files:amd64"), "{stderr}");
    assert!(stderr.contains("build without --locked"), "{stderr}");
    assert!(!dir.join("three").exists(), "outputs written: {stderr}");
    assert_eq!(
        fs::read_to_string(dir.join("small-debian.lock")).expect("lock"),
        edited
    );

    // Without commands the bootstrap is checked before the VM starts.
    let text_no_cmds = fs::read_to_string(dir.join("small-debian.toml"))
        .expect("recipe")
        .replace(SMALL_COMMANDS, "");
    fs::write(dir.join("no-commands.toml"), text_no_cmds).expect("write");
    let out = kiln(
        dir,
        &["build", "no-commands.toml", "-o", "four", "--locked"],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("no lock file"), "{stderr}");
    assert!(stderr.contains("without --locked"), "{stderr}");
    fs::write(dir.join("no-commands.lock"), &edited).expect("lock");
    let out = kiln(
        dir,
        &["build", "no-commands.toml", "-o", "four", "--locked"],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("the bootstrap's packages differ"),
        "{stderr}"
    );
    assert!(stderr.contains("~ base-files:amd64"), "{stderr}");
    assert!(
        !stderr.contains("boot build VM"),
        "the VM started: {stderr}"
    );
    assert!(!dir.join("four").exists(), "outputs written: {stderr}");
}

/// Without subordinate ids (nobody has none), an unprivileged bootstrap
/// stops before it starts, and says how to add them.
#[test]
fn a_bootstrap_without_subordinate_ids_names_the_fix() {
    if !geteuid().is_root() {
        // Only root can act as a user without subordinate ids here.
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_debian_recipe(dir);
    let cache = dir.join("cache");
    let runtime = dir.join("runtime");
    for d in [&cache, &runtime] {
        fs::create_dir_all(d).expect("mkdir");
    }
    for d in [dir, cache.as_path(), runtime.as_path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(kiln_exe())
        .args(["build", "small-debian.toml", "-o", "out"])
        .env("KILN_CACHE_DIR", &cache)
        .env("TMPDIR", &runtime)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("runuser");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("subordinate user ids for nobody in /etc/subuid"),
        "{stderr}"
    );
    assert!(stderr.contains("usermod --add-subuids"), "{stderr}");
    assert!(!dir.join("out/small.raw").exists());
}

/// Names in `dir` starting with `prefix`.
fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// A build killed outright (SIGKILL) while its VM runs leaves its runtime
/// and work directories; the next kiln removes them, and nothing else of
/// the killed one (process, mount, loop device) survives it.
#[test]
fn a_sigkilled_build_is_cleaned_up_by_the_next_kiln() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_recipe(dir, SMALL);
    let runtime = dir.join("runtime");
    fs::create_dir_all(&runtime).expect("runtime dir");
    let out_dir = dir.join("out");
    let mut child = Command::new(kiln_exe())
        .args(["build", "small.toml", "-o", "out"])
        .env("TMPDIR", &runtime)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kiln build");
    // Killed once the build VM is up: its runtime directory exists, and
    // so does the build's work directory beside the outputs.
    let started = poll_until(
        Instant::now() + Duration::from_secs(120),
        Duration::from_millis(50),
        || {
            if !entries(&runtime, "kiln-run-").is_empty()
                && !entries(&out_dir, ".kiln-build-").is_empty()
            {
                return Some(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("kiln build ended ({status}) before the test could kill it");
            }
            None
        },
    );
    assert!(started.is_some(), "the build VM never started");
    std::thread::sleep(Duration::from_millis(500));
    kill_process(Pid::from_child(&child), Signal::KILL).expect("kill kiln");
    child.wait().expect("wait");
    let needle = dir.to_string_lossy().into_owned();
    let procs = processes_left_after(&needle, Duration::from_secs(10));
    assert!(procs.is_empty(), "helpers outlived kiln: {procs:?}");
    let left_run = entries(&runtime, "kiln-run-");
    let left_work = entries(&out_dir, ".kiln-build-");
    assert!(
        !left_run.is_empty() && !left_work.is_empty(),
        "the killed build left nothing to sweep: {left_run:?} {left_work:?}"
    );

    // The next build in the same place: it sweeps, builds, and (kiln()
    // checks) leaves TMPDIR empty.
    let out = kiln(dir, &["build", "small.toml", "-o", "out"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for d in left_run.iter().chain(&left_work) {
        assert!(!d.exists(), "{} was not swept", d.display());
    }
    assert!(
        entries(&out_dir, ".").is_empty(),
        "{:?}",
        files_in(&out_dir)
    );
    assert_eq!(processes_mentioning(&needle), Vec::<String>::new());
    assert_eq!(
        mounts_and_loop_devices_mentioning(&needle),
        Vec::<String>::new()
    );
}

/// A root given as a compressed tarball (zstd, pax with a UTF-8 name as
/// mmdebstrap writes them, its length not a whole number of sectors)
/// becomes the build's tree on the host: the tools image's mke2fs reads it
/// through libarchive, with its names, owners and modes.
#[test]
fn a_compressed_root_tarball_becomes_the_tree() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_recipe(
        dir,
        &SMALL.replace("directory = \"rootdir\"", "tarball = \"root.tar.zst\""),
    );
    fs::write(dir.join("rootdir/etc/secret"), "for root only\n").expect("write");
    fs::write(dir.join("rootdir/etc/Főtanúsítvány"), "utf-8\n").expect("write");
    let tar = dir.join("root.tar.zst");
    let packed = Command::new("tar")
        .env("LC_ALL", "C.UTF-8")
        .args([
            "--zstd",
            "--format=pax",
            "--owner=0",
            "--group=0",
            "--mode=go-rwx",
            "-C",
        ])
        .arg(dir.join("rootdir"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(packed.success());
    let len = fs::metadata(&tar).expect("stat").len();
    assert_ne!(len % 512, 0, "the test wants a length off the sector size");
    let out = kiln(
        dir,
        &["build", "small.toml", "-o", "out", "--format", "raw"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ext4 = format!(
        "{}?offset={ROOT_OFFSET}",
        dir.join("out/small.raw").to_str().expect("path")
    );
    let cat = |path: &str| host("debugfs", &["-R", &format!("cat {path}"), &ext4]);
    assert_eq!(cat("/etc/secret"), "for root only\n");
    assert_eq!(cat("/etc/Főtanúsítvány"), "utf-8\n");
    assert_eq!(cat("/etc/built"), "built-in-chroot\n");
    let stat = host("debugfs", &["-R", "stat /etc/secret", &ext4]);
    assert!(
        stat.contains("Mode:  0600") && stat.contains("User:     0   Group:     0"),
        "{stat}"
    );
}

/// A tree larger than its ext4 partition: the host's mke2fs runs out of
/// room, and kiln says which partition and what to change.
#[test]
fn a_tree_too_big_for_its_partition_is_named_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_recipe_with_commands(dir, r#"["head -c 64000000 /dev/urandom > /big"]"#);
    fs::create_dir_all(dir.join("out")).expect("mkdir");
    fs::write(dir.join("out/keep.txt"), "mine").expect("write");
    let out = kiln(dir, &["build", "small.toml", "-o", "out"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("partition 2 (root) is too small for its tree")
            && err.contains("ran out of space")
            && err.contains("larger size in the recipe"),
        "{err}"
    );
    assert_eq!(files_in(&dir.join("out")), ["keep.txt"]);
}

#[test]
fn a_failing_command_names_its_step_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_recipe_with_commands(dir, r#"["true", "echo going wrong; false"]"#);
    fs::create_dir_all(dir.join("out")).expect("mkdir");
    fs::write(dir.join("out/keep.txt"), "mine").expect("write");
    let out = kiln(dir, &["build", "small.toml", "-o", "out"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("step 'command 2' failed"), "{err}");
    assert!(
        err.contains("going wrong"),
        "shows the command's output: {err}"
    );
    assert_eq!(files_in(&dir.join("out")), ["keep.txt"]);

    // An output directory kiln made itself does not stay behind, empty.
    let out = kiln(dir, &["build", "small.toml", "-o", "new/out"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(!dir.join("new/out").exists(), "kiln left new/out behind");
}

/// The steps' layers as `kiln build --json` reports them: (step, reused).
fn layers_of(out: &Output) -> Vec<(String, bool)> {
    assert!(out.status.success(), "build failed: {}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    summary["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["step"].as_str().expect("step").to_string(),
                l["reused"].as_bool().expect("reused"),
            )
        })
        .collect()
}

/// A rebuild after the last command changed reuses every layer before it
/// and runs the rest; its image is byte for byte the one a --fresh build
/// (every step run) makes. A failed step keeps the layers before it.
#[test]
fn a_rebuild_reuses_the_layers_before_a_change_and_matches_a_fresh_build() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // Unique to this run, in a file (which the configure step installs):
    // no earlier run's layers exist for it.
    let token = dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let commands = |last: &str| {
        format!(r#"["echo {token} > /etc/first", "echo {last} > /etc/last; rm /etc/passwd"]"#)
    };
    let set_commands = |commands: &str| {
        let text = SMALL
            .replace(SMALL_COMMANDS, &format!("commands = {commands}"))
            .replace("hello from kiln", &token);
        fs::write(dir.join("small.toml"), text).expect("write recipe");
    };
    small_recipe_with_commands(dir, &commands("one"));
    set_commands(&commands("one"));
    let build = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "build",
            "small.toml",
            "-o",
            out,
            "--json",
            "--format",
            "raw",
        ];
        args.extend_from_slice(extra);
        kiln(dir, &args)
    };
    let step = |name: &str, reused: bool| (name.to_string(), reused);
    let first = build("a", &[]);
    assert_eq!(
        layers_of(&first),
        [
            step("configure", false),
            step("command 1", false),
            step("command 2", false),
            step("normalize", false)
        ]
    );
    // The same recipe again: nothing runs in the tree.
    let again = build("b", &[]);
    assert!(layers_of(&again).iter().all(|(_, reused)| *reused));
    let raw = |out: &str| dir.join(out).join("small.raw");
    assert_eq!(sha256_of(&raw("a")), sha256_of(&raw("b")));

    set_commands(&commands("two"));
    let changed = build("c", &[]);
    assert_eq!(
        layers_of(&changed),
        [
            step("configure", true),
            step("command 1", true),
            step("command 2", false),
            step("normalize", false)
        ]
    );
    let ext4 = format!("{}?offset={ROOT_OFFSET}", raw("c").display());
    let cat = |path: &str| host("debugfs", &["-R", &format!("cat {path}"), &ext4]);
    assert_eq!(cat("/etc/last"), "two\n");
    assert_eq!(cat("/etc/first"), format!("{token}\n"));
    // A whiteout in a layer removes the base's file from the image.
    let ls = host("debugfs", &["-R", "ls /etc", &ext4]);
    assert!(!ls.contains("passwd"), "{ls}");
    assert!(ls.contains("group"), "{ls}");

    let fresh = build("d", &["--fresh"]);
    assert!(layers_of(&fresh).iter().all(|(_, reused)| !*reused));
    assert_eq!(sha256_of(&raw("c")), sha256_of(&raw("d")));
    assert_ne!(sha256_of(&raw("a")), sha256_of(&raw("c")));

    // A failing last command: the layers before it stay, so the fixed
    // recipe runs only from there.
    set_commands(&format!(
        r#"["echo {token} > /etc/first", "echo three > /etc/last; false"]"#
    ));
    assert_eq!(build("e", &[]).status.code(), Some(125));
    set_commands(&commands("three"));
    assert_eq!(
        layers_of(&build("e", &[])),
        [
            step("configure", true),
            step("command 1", true),
            step("command 2", false),
            step("normalize", false)
        ]
    );
}

/// `--debug-shell` as a person uses it, on a terminal: the failed step is
/// named, the shell is in the tree as the step left it with the disks
/// attached and the step's environment, and Ctrl-D ends the build as the
/// failure would have: exit 125, nothing written, nothing left.
#[test]
fn debug_shell_opens_where_a_step_failed_and_the_build_still_fails() {
    if !tmux::available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_recipe_with_commands(
        dir,
        r#"["true", "echo written-then-failed > /etc/half-done; echo going wrong; false"]"#,
    );
    fs::create_dir_all(dir.join("out")).expect("mkdir");
    fs::write(dir.join("out/keep.txt"), "mine").expect("write");
    let runtime = dir.join("runtime");
    fs::create_dir_all(&runtime).expect("runtime dir");
    let tmpdir = format!("TMPDIR={}", runtime.display());
    let kiln = kiln_exe().to_string_lossy().into_owned();
    let argv = [
        "env",
        "-u",
        "SOURCE_DATE_EPOCH",
        &tmpdir,
        &kiln,
        "build",
        "small.toml",
        "-o",
        "out",
        "--debug-shell",
    ];
    let tmux = Tmux::start(dir, "build", (120, 40), dir, &argv);
    let build = Duration::from_secs(300);
    let step = Duration::from_secs(30);

    // The banner, then the shell's prompt, in the tree.
    let screen = tmux.wait_for("prompt in /build/root", build, |s| {
        s.lines().any(|l| l.trim_end() == "root@kiln:/build/root#")
    });
    assert!(
        screen.contains("kiln: step 'command 2' failed (exit status 1)"),
        "the banner names the step:\n{screen}"
    );
    assert!(screen.contains("going wrong"), "and its output:\n{screen}");
    assert!(
        screen.contains("chroot /build/root"),
        "and how to enter the tree:\n{screen}"
    );

    // The tree as the failed command left it.
    tmux.send(&["cat /build/root/etc/half-done", "Enter"]);
    tmux.wait_for_line("written-then-failed", 1, step);
    // The image's disk is attached.
    tmux.send(&["ls -1 /dev/disk/by-id/", "Enter"]);
    tmux.wait_for_line("virtio-kiln-target", 1, step);
    // The steps' environment (the output, not the echo of the `$`).
    tmux.send(&["echo step-env=$KILN_TARGET_SERIAL", "Enter"]);
    tmux.wait_for_line("step-env=kiln-target", 1, step);

    // Ctrl-D at a fresh prompt (see shell_is_an_interactive_terminal in
    // tests/run.rs) ends the build with the step's failure.
    tmux.wait_for_line("root@kiln:/build/root#", 1, step);
    tmux.send(&["C-d"]);
    let exit = tmux.wait_for_exit(Duration::from_secs(60));
    let screen = tmux.screen();
    assert_eq!(
        exit,
        Some(125),
        "kiln did not end with the shell:\n{screen}"
    );
    assert!(
        screen.contains("kiln: step 'command 2' failed with exit status 1"),
        "the build's own error:\n{screen}"
    );
    drop(tmux);
    assert_eq!(files_in(&dir.join("out")), ["keep.txt"]);
    let left = files_in(&runtime);
    assert!(left.is_empty(), "kiln left runtime files behind: {left:?}");
    // VMs and helpers mention kiln's runtime directory; the pane's shell
    // may take a moment to go with its server.
    let needle = runtime.to_string_lossy().into_owned();
    let gone = poll_until(
        Instant::now() + Duration::from_secs(5),
        Duration::from_millis(50),
        || processes_mentioning(&needle).is_empty().then_some(()),
    );
    assert!(
        gone.is_some(),
        "kiln left processes behind: {:?}",
        processes_mentioning(&needle)
    );
}

/// Without a terminal the debug shell takes its commands from stdin (as a
/// script would feed it) and ends with it; the build then fails as usual.
#[test]
fn debug_shell_reads_stdin_without_a_terminal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_recipe_with_commands(
        dir,
        r#"["echo written-then-failed > /etc/half-done; false"]"#,
    );
    let out = kiln_with_stdin(
        dir,
        &["build", "small.toml", "-o", "out", "--debug-shell"],
        b"cat /build/root/etc/half-done\n",
    );
    assert_eq!(out.status.code(), Some(125));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("written-then-failed"), "{stdout}");
    let err = text(&out.stderr);
    assert!(err.contains("step 'command 1' failed"), "{err}");
    assert!(!dir.join("out").exists(), "kiln made out/");
}

/// A command that asks for the network reaches the mirror by name, with
/// the tree's resolv.conf put back after it (unless the command made its
/// own); the other commands of the same build have no route.
#[test]
fn only_the_commands_that_ask_get_the_network() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_recipe_with_commands(
        dir,
        r#"[
    "busybox ln -s ../run/resolved.conf /etc/resolv.conf",
    { run = "busybox wget -q -O /etc/release http://deb.debian.org/debian/dists/bookworm/Release", network = true },
    "busybox readlink /etc/resolv.conf > /etc/link-after",
    "cat /proc/net/route > /etc/routes; busybox wget -q -T 10 -O /etc/offline http://deb.debian.org/ || echo unreachable > /etc/offline",
    { run = "echo nameserver 192.0.2.53 > /etc/resolv.conf", network = true },
]"#,
    );
    let out = kiln(dir, &["build", "small.toml", "-o", "out"]);
    assert!(out.status.success(), "build failed: {}", text(&out.stderr));
    let ext4 = format!(
        "{}?offset={ROOT_OFFSET}",
        dir.join("out/small.raw").display()
    );
    let cat = |path: &str| host("debugfs", &["-R", &format!("cat {path}"), &ext4]);
    let release = cat("/etc/release");
    assert!(release.starts_with("Origin: Debian"), "{release}");
    assert_eq!(cat("/etc/offline"), "unreachable\n");
    // Only the header: no interface, no route.
    assert_eq!(
        cat("/etc/routes").lines().count(),
        1,
        "{}",
        cat("/etc/routes")
    );
    // The tree's own resolv.conf (a link) was put back after the command;
    // one a command made itself is kept; nothing of kiln's is left.
    assert_eq!(cat("/etc/link-after"), "../run/resolved.conf\n");
    assert_eq!(cat("/etc/resolv.conf"), "nameserver 192.0.2.53\n");
    let etc = host("debugfs", &["-R", "ls /etc", &ext4]);
    assert!(
        !etc.contains(".resolv.conf.kiln"),
        "left in the tree: {etc}"
    );
}

#[test]
fn recipe_errors_are_clear_and_build_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    small_recipe(dir, SMALL);
    for (name, recipe, wants) in [
        (
            "unknown key",
            SMALL.replace(
                "hostname = \"tiny\"",
                "hostname = \"tiny\"\nhostnme = \"x\"",
            ),
            vec!["bad.toml", "hostnme", "kernel_cmdline"],
        ),
        (
            "partition too large",
            SMALL.replace("size = \"16M\"", "size = \"100M\""),
            vec!["bad.toml", "partition", "64 MiB"],
        ),
        (
            "missing input",
            SMALL.replace("source = \"hello.txt\"", "source = \"missing.txt\""),
            vec!["bad.toml", "file[1].source", "missing.txt"],
        ),
    ] {
        fs::write(dir.join("bad.toml"), recipe).expect("write");
        let out = kiln(dir, &["build", "bad.toml", "-o", "bad-out"]);
        assert_eq!(out.status.code(), Some(125), "{name}");
        let err = text(&out.stderr);
        for w in wants {
            assert!(err.contains(w), "{name}: '{w}' not in: {err}");
        }
        assert!(
            !dir.join("bad-out").exists(),
            "{name}: output directory made"
        );
    }
}

#[test]
fn boot_reports_a_machine_that_never_matches() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // A disk with nothing to boot: the serial console never shows a login
    // prompt, so the wait ends at the timeout with exit 124.
    let img = dir.join("empty.raw");
    fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    let out = kiln(
        dir,
        &[
            "boot",
            "empty.raw",
            "--firmware",
            "bios",
            "--timeout",
            "3",
            "--expect",
            "login:",
        ],
    );
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("did not match 'login:'"));
    let bad = kiln(dir, &["boot", "empty.raw", "--expect", "("]);
    assert_eq!(bad.status.code(), Some(125));
    assert!(text(&bad.stderr).contains("not a valid regular expression"));
}

/// The shipped minimal recipe: built, booted to a login prompt under UEFI
/// (OVMF) and BIOS (SeaBIOS), inspected, and built again to the same bytes.
#[test]
fn debian_minimal_boots_under_uefi_and_bios_and_rebuilds_identically() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/debian-bookworm-minimal.toml");
    let recipe_s = recipe.to_str().expect("path");
    let out = kiln(dir, &["build", recipe_s, "-o", "one", "--format", "raw"]);
    assert!(out.status.success(), "build failed: {}", text(&out.stderr));
    let raw = dir.join("one/debian-bookworm-minimal.raw");
    let raw_s = raw.to_str().expect("path");

    let table = host("sgdisk", &["-p", raw_s]);
    assert!(table.contains("EF00") && table.contains("EF02"), "{table}");
    let esp = format!("{raw_s}@@1M");
    host("mdir", &["-i", &esp, "::/EFI/BOOT/BOOTX64.EFI"]);
    let root = format!("{raw_s}?offset={}", (1 + 128 + 1) << 20);
    let cfg = host("debugfs", &["-R", "cat /boot/grub/grub.cfg", &root]);
    assert!(cfg.contains("console=ttyS0"), "{cfg}");
    let keys = host("debugfs", &["-R", "cat /root/.ssh/authorized_keys", &root]);
    assert!(keys.contains("kiln-example"), "{keys}");
    let ssh = host("debugfs", &["-R", "ls /etc/ssh", &root]);
    assert!(
        !ssh.contains("ssh_host_ed25519_key"),
        "host keys are baked in: {ssh}"
    );
    // The bootstrap made the initramfs once, at its end, and the real
    // update-initramfs is back: no stand-in, no diversion of kiln's.
    let boot = host("debugfs", &["-R", "ls /boot", &root]);
    assert!(boot.contains("initrd.img-"), "no initramfs: {boot}");
    let diversions = host("debugfs", &["-R", "cat /var/lib/dpkg/diversions", &root]);
    assert!(!diversions.contains("kiln"), "{diversions}");
    let sbin = host("debugfs", &["-R", "ls /usr/sbin", &root]);
    assert!(!sbin.contains("kiln-deferred"), "{sbin}");
    let tool = host("debugfs", &["-R", "cat /usr/sbin/update-initramfs", &root]);
    assert!(tool.contains("mkinitramfs"), "not the real one: {tool}");

    for fw in ["uefi", "bios"] {
        let out = kiln(
            dir,
            &[
                "boot",
                raw_s,
                "--firmware",
                fw,
                "--expect",
                "login:",
                "--timeout",
                "600",
            ],
        );
        assert!(
            out.status.success(),
            "{fw} boot failed: {}",
            text(&out.stderr)
        );
    }

    let again = kiln(dir, &["build", recipe_s, "-o", "two", "--format", "raw"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(
        sha256_of(&raw),
        sha256_of(&dir.join("two/debian-bookworm-minimal.raw")),
        "two builds of one recipe differ"
    );
}

#[test]
fn live_iso_boots_from_cd_and_usb_under_both_firmwares_and_rebuilds_identically() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/live-iso.toml");
    let recipe_s = recipe.to_str().expect("path");
    let out = kiln(dir, &["build", recipe_s, "-o", "one"]);
    assert!(out.status.success(), "build failed: {}", text(&out.stderr));
    let iso = dir.join("one/debian-bookworm-live.iso");
    assert_eq!(
        files_in(&dir.join("one")),
        [
            "debian-bookworm-live.iso",
            "debian-bookworm-live.iso.sha256",
            "debian-bookworm-live.packages"
        ]
    );

    // The same bytes as a CD and as a USB stick (a plain disk: the hybrid
    // MBR for BIOS, the GPT EFI partition for UEFI).
    let usb = dir.join("usb.raw");
    std::fs::copy(&iso, &usb).expect("copy iso");
    for image in [&iso, &usb] {
        for fw in ["bios", "uefi"] {
            let out = kiln(
                dir,
                &[
                    "boot",
                    image.to_str().expect("path"),
                    "--firmware",
                    fw,
                    "--expect",
                    "debian login:",
                    "--timeout",
                    "600",
                ],
            );
            assert!(
                out.status.success(),
                "{} under {fw} did not boot: {}",
                image.display(),
                text(&out.stderr)
            );
        }
    }

    let again = kiln(dir, &["build", recipe_s, "-o", "two"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(
        sha256_of(&iso),
        sha256_of(&dir.join("two/debian-bookworm-live.iso")),
        "two builds of the live iso differ"
    );
}

#[test]
fn cloud_image_grows_its_root_on_first_boot_under_cloud_init() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/debian-bookworm-cloud.toml");
    let out = kiln(dir, &["build", recipe.to_str().expect("path"), "-o", "out"]);
    assert!(out.status.success(), "build failed: {}", text(&out.stderr));
    let qcow2 = dir.join("out/debian-bookworm-cloud.qcow2");
    let qcow2_s = qcow2.to_str().expect("path");
    let info = host("qemu-img", &["info", "-f", "qcow2", qcow2_s]);
    assert!(info.contains("virtual size: 2 GiB"), "{info}");
    let before = sha256_of(&qcow2);

    // A NoCloud seed whose runcmd reports the root's size, on a disk the
    // "cloud" made 4 GiB: growpart and resize_rootfs must have run.
    let seed = dir.join("seed");
    fs::create_dir(&seed).expect("mkdir");
    fs::write(
        seed.join("user-data"),
        "#cloud-config\nruncmd:\n  - echo \"KILN_ROOT_MIB=$(df -BM --output=size / | tail -n 1 | tr -d ' M')\" > /dev/ttyS0\n",
    )
    .expect("user-data");
    let out = kiln(
        dir,
        &[
            "boot",
            qcow2_s,
            "--disk-size",
            "4G",
            "--cloud-init",
            seed.to_str().expect("path"),
            "--expect",
            // The newline: the number may arrive in more than one piece.
            "KILN_ROOT_MIB=[0-9]+\n",
            "--timeout",
            "900",
            "--json",
        ],
    );
    assert!(out.status.success(), "boot failed: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let mib: u64 = v["matched"]
        .as_str()
        .and_then(|m| m.trim_end().strip_prefix("KILN_ROOT_MIB="))
        .and_then(|n| n.parse().ok())
        .expect("a size");
    assert!(
        mib > 3500,
        "the root was not grown to the 4 GiB disk: {mib} MiB"
    );
    assert_eq!(sha256_of(&qcow2), before, "booting wrote to the image");
}

/// The README's debos example, as the user running the tests (a normal
/// user in CI's second pass): debos without its fakemachine, root in the
/// guest, bootstraps Debian from the mirror through `--net`, partitions a
/// loop-attached image in the shared recipe directory and installs GRUB.
/// The image is the user's, debos left nothing else there, and it boots.
#[test]
#[ignore = "about 10 minutes under TCG: CI runs it once, as a normal user (.ci/unprivileged)"]
fn debos_builds_a_bootable_image_under_kiln() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("debos");
    copy_example("debos", &dir);
    run_builder(
        tmp.path(),
        "debos",
        &["debos", "parted", "dosfstools", "udev"],
        &[
            "--share",
            "debos:/src",
            "--workdir",
            "/root",
            "--",
            "/src/build.sh",
            "/src/debian.yaml",
        ],
    );
    assert_eq!(
        files_in(&dir),
        [
            "build.sh",
            "debian-debos.img",
            "debian.yaml",
            "grub.sh",
            "initramfs.sh",
            "setup.sh"
        ]
    );
    let image = dir.join("debian-debos.img");
    let image_s = image.to_str().expect("path");
    host(
        "mdir",
        &["-i", &format!("{image_s}@@1M"), "::/EFI/BOOT/BOOTX64.EFI"],
    );
    assert_users_gpt_image_boots(tmp.path(), &image, "root", &["--timeout", "600"]);
}

/// The README's mkosi example, as the user running the tests (a normal
/// user in CI's second pass): Debian's mkosi 14, which needs root on a
/// host, builds images/mkosi's bootable bookworm image as root in the
/// guest (debootstrap, loop devices, systemd-nspawn, dracut, systemd-boot
/// with a unified kernel image) from the shared directory, in the guest's
/// own /root; --copy-out brings the image out sparse and the user's, and
/// it boots to a login prompt under UEFI.
#[test]
#[ignore = "about 15 minutes under TCG: CI runs it once, as a normal user (.ci/unprivileged)"]
fn mkosi_builds_a_bootable_image_under_kiln() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mkosi");
    copy_example("mkosi", &dir);
    run_builder(
        tmp.path(),
        "mkosi",
        &["mkosi", "apt", "ca-certificates", "binutils"],
        &[
            "--timeout",
            "3600",
            "--share",
            "mkosi:/src",
            "--workdir",
            "/root",
            "--copy-out",
            "/root/out/debian~bookworm/image.raw:mkosi/image.raw",
            "--",
            "mkosi",
            "-C",
            "/src",
            "--output-dir",
            "/root/out",
            "--force",
            "build",
        ],
    );
    // mkosi wrote nothing into the shared directory; only the copy-out did.
    assert_eq!(files_in(&dir), ["image.raw", "mkosi.conf"]);
    let image = dir.join("image.raw");
    let meta = fs::metadata(&image).expect("image");
    // Sparse, as mkosi made it in the guest: the copy-out kept the holes.
    assert!(
        meta.blocks() * 512 < meta.len() * 9 / 10,
        "image.raw came out without its holes: {} of {} bytes allocated",
        meta.blocks() * 512,
        meta.len()
    );
    // The whole console (--console), should the boot fail: where it
    // stopped is rarely in the last lines.
    assert_users_gpt_image_boots(
        tmp.path(),
        &image,
        "Root Partition",
        &["--timeout", "900", "--console"],
    );
}

/// `kiln run` of another image builder the way the README shows it: with
/// the network, 3G and 2 vCPUs, a tools image with `tools` added, then
/// `rest` (shares, working directory, the command); it must succeed.
fn run_builder(dir: &Path, builder: &str, tools: &[&str], rest: &[&str]) {
    let mut args = vec!["run", "--net", "--mem", "3G", "--cpus", "2"];
    for t in tools {
        args.extend(["--tools-package", t]);
    }
    args.extend_from_slice(rest);
    let out = kiln(dir, &args);
    assert!(
        out.status.success(),
        "{builder} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// A builder's image on the host: the user's, a GPT with an EFI system
/// partition and one named `root_name`, and it boots under UEFI to a login
/// prompt (`boot_args`: its timeout and such).
fn assert_users_gpt_image_boots(dir: &Path, image: &Path, root_name: &str, boot_args: &[&str]) {
    let owner = fs::metadata(image).expect("image").uid();
    assert_eq!(owner, geteuid().as_raw(), "the image is not the user's");
    let image_s = image.to_str().expect("path");
    let table = host("sgdisk", &["-p", image_s]);
    assert!(
        table.contains("EF00") && table.contains(root_name),
        "{table}"
    );
    let mut args = vec!["boot", image_s, "--firmware", "uefi"];
    args.extend_from_slice(boot_args);
    let boot = kiln(dir, &args);
    assert!(boot.status.success(), "boot failed: {}", text(&boot.stderr));
}
