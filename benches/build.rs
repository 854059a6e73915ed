//! Build benchmark: `cargo bench --bench build [-- RUNS]` (default 3).
//!
//! 1. `kiln build images/debian-bookworm-minimal.toml`, with a fresh
//!    bootstrap each run: median wall time, split into the host bootstrap
//!    and the steps in the VM (and the conversions after); interleaved
//!    with mkosi 14 building `images/mkosi/`'s image with the recipe's
//!    packages, as root on the host (no VM), where it can (root, and mkosi
//!    installed: `.ci/setup --bench`), for both medians and the ratio.
//! 2. The same root tarball turned into a GPT disk with one ext4 partition,
//!    by `virt-make-fs` (libguestfs, from Debian's libguestfs-tools) and by
//!    `kiln build` of a recipe with only that step, interleaved in the same
//!    run: both medians and the ratio.
//!
//! Figures, not tests: nothing here fails on speed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[path = "support/kiln_build.rs"]
mod kiln_build;
use kiln_build::{fail, kiln_build, median};

fn step_seconds(v: &serde_json::Value, pred: impl Fn(&str) -> bool) -> f64 {
    v["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter(|s| s["step"].as_str().is_some_and(&pred))
                .filter_map(|s| s["seconds"].as_f64())
                .sum()
        })
        .unwrap_or(0.0)
}

/// Whether mkosi can build here, or why not: it needs root on the host.
fn mkosi_baseline() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("mkosi needs root, and this bench runs as a normal user".into());
    }
    let found = Command::new("mkosi")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Err("mkosi is not installed (bash .ci/setup --bench installs it)".into());
    }
    // It mounts the image's partitions on loop devices: the ESP as vfat,
    // built in or a module this kernel can load.
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let modules = Path::new("/lib/modules")
        .join(release.trim())
        .join("kernel/fs");
    for (fs, module) in [("vfat", "fat"), ("ext4", "ext4")] {
        if !filesystems.split_whitespace().any(|f| f == fs) && !modules.join(module).exists() {
            return Err(format!(
                "this kernel cannot mount {fs} (not in /proc/filesystems, no module in {}), \
                 and mkosi mounts the image's partitions",
                modules.display()
            ));
        }
    }
    Ok(())
}

/// images/mkosi/'s configuration with the minimal recipe's packages (mkosi
/// adds systemd, dbus, dracut, the kernel and systemd-boot by itself), in a
/// directory of `work`.
fn mkosi_config(repo: &Path, work: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo.join("images/mkosi/mkosi.conf"))
        .unwrap_or_else(|e| fail(&format!("images/mkosi/mkosi.conf: {e}")));
    let line = "Packages=udev\n";
    if !text.contains(line) {
        fail("images/mkosi/mkosi.conf has no `Packages=udev` line to add the recipe's packages to");
    }
    let text = text.replace(
        line,
        "Packages=udev openssh-server iproute2 netbase systemd-resolved\n",
    );
    let dir = work.join("mkosi-config");
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("mkosi.conf"), text))
        .unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
    dir
}

/// One mkosi build of `config` into `out`, from scratch: its seconds, or
/// why it failed.
fn mkosi_build(config: &Path, out: &Path) -> Result<f64, String> {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let started = Instant::now();
    let st = Command::new("mkosi")
        .arg("-C")
        .arg(config)
        .arg("--output-dir")
        .arg(out)
        .args(["--force", "build"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("mkosi: {e}"))?;
    if !st.success() {
        return Err(format!("mkosi build failed ({st}; its output is above)"));
    }
    Ok(started.elapsed().as_secs_f64())
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3)
        .max(1);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::Builder::new()
        .prefix("kiln-build-bench-")
        .tempdir_in(repo.join("target"))
        .unwrap_or_else(|e| fail(&e.to_string()));
    let minimal = repo.join("images/debian-bookworm-minimal.toml");

    // 1. The whole minimal image, and mkosi's where it can run.
    let mut mkosi = mkosi_baseline();
    let (mut total, mut host, mut vm, mut convert) = (vec![], vec![], vec![], vec![]);
    let mut mkosi_t = vec![];
    let mut archive = None;
    for i in 0..runs {
        let (took, v) = kiln_build(&minimal, &work.path().join("minimal"), &["--fresh"]);
        total.push(took.as_secs_f64());
        host.push(step_seconds(&v, |s| s == "root filesystem"));
        convert.push(step_seconds(&v, |s| s.starts_with("write ")));
        vm.push(took.as_secs_f64() - host[i] - convert[i]);
        archive = v["root_archive"].as_str().map(PathBuf::from);
        eprintln!("run {}: {:.1} s", i + 1, took.as_secs_f64());
        if mkosi.is_ok() {
            // A failed mkosi run ends the baseline, not the bench.
            match mkosi_build(
                &mkosi_config(&repo, work.path()),
                &work.path().join("mkosi"),
            ) {
                Ok(t) => {
                    eprintln!("run {}: mkosi {t:.1} s", i + 1);
                    mkosi_t.push(t);
                }
                Err(why) => mkosi = Err(why),
            }
        }
    }
    println!("kiln build images/debian-bookworm-minimal.toml, {runs} runs (medians):");
    println!(
        "  total                          {:>7.1} s",
        median(&mut total)
    );
    println!(
        "  host bootstrap (mmdebstrap)    {:>7.1} s",
        median(&mut host)
    );
    println!(
        "  build VM (boot + steps + off)  {:>7.1} s",
        median(&mut vm)
    );
    println!(
        "  format conversions + sha256    {:>7.1} s",
        median(&mut convert)
    );
    // kiln's packages come from its package cache: a first build that
    // downloaded them all measured the same (issue 13's notes).
    println!("  (packages from kiln's package cache; mkosi downloads its own each run)");
    match &mkosi {
        Ok(()) => {
            let m = median(&mut mkosi_t);
            println!(
                "mkosi 14 build (images/mkosi/ + the recipe's packages), as root on the host:"
            );
            println!("  total                          {m:>7.1} s");
            println!(
                "  ratio kiln / mkosi             {:>7.2}",
                median(&mut total) / m
            );
        }
        Err(why) => println!("mkosi baseline skipped: {why}"),
    }

    // 2. Tarball to ext4 disk: virt-make-fs against kiln.
    let Some(archive) = archive else {
        fail("kiln did not report its root archive")
    };
    let recipe = work.path().join("tar-to-ext4.toml");
    std::fs::write(
        &recipe,
        format!(
            "name = \"tar-to-ext4\"\nsize = \"2G\"\n\n[[partition]]\nlabel = \"root\"\n\
             size = \"rest\"\ntype = \"linux\"\nfilesystem = \"ext4\"\nmount = \"/\"\n\n\
             [root]\ntarball = \"{}\"\n",
            archive.display()
        ),
    )
    .unwrap_or_else(|e| fail(&e.to_string()));
    let have_vmf = Command::new("virt-make-fs")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // libguestfs tries KVM first; where KVM cannot run an unmodified guest
    // (as kiln found it), both tools get TCG, so they run on equal terms.
    let kvm = kiln_vmm::host::probe(Path::new("/dev/kvm"), Path::new("/sys/module"));
    let tcg = !matches!(kvm, kiln_vmm::host::KvmSupport::Usable);
    let virt_make_fs = |out: &Path| -> f64 {
        let _ = std::fs::remove_file(out);
        let mut cmd = Command::new("virt-make-fs");
        if tcg {
            cmd.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
        }
        let started = Instant::now();
        let st = cmd
            .args([
                "--format=raw",
                "--type=ext4",
                "--partition=gpt",
                "--size=2G",
            ])
            .arg(&archive)
            .arg(out)
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| fail(&format!("virt-make-fs: {e}")));
        if !st.success() {
            fail("virt-make-fs failed");
        }
        started.elapsed().as_secs_f64()
    };
    let vmf_out = work.path().join("vmf.img");
    if have_vmf {
        // Untimed: libguestfs builds its appliance on first use, as kiln
        // builds its kernel and tools image once.
        virt_make_fs(&vmf_out);
    }
    let (mut kiln_t, mut vmf_t) = (vec![], vec![]);
    for _ in 0..runs {
        let (took, _) = kiln_build(&recipe, &work.path().join("tar"), &[]);
        kiln_t.push(took.as_secs_f64());
        if have_vmf {
            vmf_t.push(virt_make_fs(&vmf_out));
        }
    }
    println!(
        "root tarball -> 2 GiB GPT disk with ext4, {runs} runs (medians{}):",
        if tcg {
            ", both under TCG"
        } else {
            ", both under KVM"
        }
    );
    let k = median(&mut kiln_t);
    println!("  kiln build                     {k:>7.1} s");
    if have_vmf {
        let b = median(&mut vmf_t);
        println!("  virt-make-fs (libguestfs)      {b:>7.1} s");
        println!("  ratio kiln / virt-make-fs      {:>7.2}", k / b);
    } else {
        println!(
            "  virt-make-fs: not installed, no baseline \
             (bash .ci/setup --bench installs libguestfs-tools)"
        );
    }
}
