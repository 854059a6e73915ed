//! `kiln build RECIPE`: the root filesystem is prepared on the host without
//! privileges, every privileged step (partitioning, mkfs, ownership, grub)
//! runs in one build VM, and the outputs are converted on the host. Nothing
//! appears under a final name until every output is complete.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use kiln_agent::ExecRequest;
use kiln_vmm::{DiskConfig, DiskFormat};

use super::apt_cache::{self, AptCache};
use super::layers::{base, keys, store};
use super::plan::{self, LayerSpan, Step};
use super::recipe::{Checked, Format, RootSource};
use super::{ext4, ids, lock, output, rootfs};
use crate::sandbox::backend::BackendChoice;
use crate::sandbox::guest::{login_shell, Guest, GuestConfig};
use crate::sandbox::host_tools::HostTools;
use crate::sandbox::session::ExecOutcome;
use crate::sandbox::tools;
use crate::sandbox::SandboxError;
use crate::util::ctrl_c;
use crate::util::owned_dir::{self, OwnedDir};
use crate::util::packages::Packages;
use crate::util::spinner::spinner;
use crate::util::tail::Tail;

pub struct BuildOptions {
    pub recipe: PathBuf,
    pub out_dir: PathBuf,
    pub formats: Vec<Format>,
    pub json: bool,
    pub verbose: bool,
    /// In range for every backend (see `cli::vm_args`).
    pub mem_mib: u32,
    pub cpus: u8,
    pub backend: BackendChoice,
    /// Bootstrap the Debian root again instead of using the cached one.
    pub fresh: bool,
    pub timeout: Option<u64>,
    /// Open a shell in the build VM when a step fails, before it stops.
    pub debug_shell: bool,
    /// Refuse to build when the image's packages differ from the recipe's
    /// lock, instead of rewriting the lock.
    pub locked: bool,
}

/// Where the dpkg status file is in the build VM's tree.
fn guest_dpkg_status() -> String {
    format!("{}/var/lib/dpkg/status", plan::TREE)
}

/// The epoch every timestamp in the image is clamped to:
/// SOURCE_DATE_EPOCH, else the recipe's `source_date_epoch`, else a date
/// derived from the recipe's text (in 2020-2025, so tools that distrust
/// very old dates stay quiet).
fn epoch(c: &Checked) -> Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH='{v}' is not a number of seconds"));
    }
    if let Some(e) = c.recipe.source_date_epoch {
        return Ok(e);
    }
    Ok(ids::fallback_epoch(c))
}

/// The build's work directory in the output directory: `.kiln-build-<random>`.
const WORK_PREFIX: &str = ".kiln-build-";

/// Removes, on drop, the output directory kiln made for a build that ends
/// with nothing in it.
struct RemoveIfEmpty(Option<PathBuf>);

impl Drop for RemoveIfEmpty {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            // Fails, as it should, unless the directory is empty.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[derive(serde::Serialize)]
struct StepTime {
    step: String,
    seconds: f64,
    /// A tree step whose layer came from the cache: it did not run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    reused: bool,
}

#[derive(serde::Serialize)]
struct OutputSummary {
    format: String,
    path: PathBuf,
    size: u64,
    sha256: String,
}

/// The output lines of a step kept for its error message.
const STEP_TAIL_LINES: usize = 30;

/// Shows a step's progress; keeps its last output lines for the error.
struct StepLog {
    bar: ProgressBar,
    lines: Tail,
    partial: Vec<u8>,
    /// Every line starting with `KILN_`: what the step tells kiln.
    marks: Vec<String>,
    echo: bool,
}

impl StepLog {
    fn new(name: &str, quiet: bool) -> StepLog {
        let bar = spinner(name, quiet);
        StepLog {
            bar,
            lines: Tail::new(STEP_TAIL_LINES),
            partial: Vec::new(),
            marks: Vec::new(),
            echo: false,
        }
    }

    fn take(&mut self, data: &[u8]) {
        if self.echo {
            self.bar.suspend(|| {
                let _ = std::io::stderr().write_all(data);
            });
        }
        self.partial.extend_from_slice(data);
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if line.is_empty() {
                continue;
            }
            if line.starts_with("KILN_") {
                self.marks.push(line.clone());
            }
            self.bar
                .set_message(line.chars().take(120).collect::<String>());
            self.lines.push(line);
        }
    }

    /// The lines kept, and after them an unfinished last line.
    fn tail(&mut self) -> String {
        let mut lines: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            lines.push(String::from_utf8_lossy(&rest).into_owned());
        }
        lines.join("\n")
    }
}

struct LogWriter<'a>(&'a std::cell::RefCell<StepLog>);

impl Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().take(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Times host-side and guest-side steps, and reports each as it ends.
struct Progress {
    json: bool,
    times: Vec<StepTime>,
}

impl Progress {
    fn host<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        let bar = spinner(name, self.json);
        let r = f();
        bar.finish_and_clear();
        let r = r.with_context(|| format!("step '{name}' failed"))?;
        self.done(name, started.elapsed());
        Ok(r)
    }

    fn done(&mut self, name: &str, took: Duration) {
        if !self.json {
            eprintln!("  {name:<20} {:>7.1} s", took.as_secs_f64());
        }
        self.times.push(StepTime {
            step: name.to_string(),
            seconds: (took.as_secs_f64() * 10.0).round() / 10.0,
            reused: false,
        });
    }

    /// A tree step whose layer the cache had.
    fn reused(&mut self, name: &str) {
        if !self.json {
            eprintln!("  {name:<20} {:>9}", "reused");
        }
        self.times.push(StepTime {
            step: name.to_string(),
            seconds: 0.0,
            reused: true,
        });
    }
}

/// `e`, or that the user interrupted the build if Ctrl-C was pressed: it
/// reaches the host tools' processes too, whose own failure it then is.
fn interrupted_or(e: anyhow::Error) -> anyhow::Error {
    if ctrl_c::requested() {
        SandboxError::Interrupted.into()
    } else {
        e
    }
}

/// The value of the last line among `marks` that starts with `mark`.
fn mark<'a>(marks: &'a [String], mark: &str) -> Option<&'a str> {
    marks
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix(mark))
        .map(str::trim)
}

/// Runs the plan's steps in the build VM.
struct StepRunner<'a> {
    guest: &'a mut Guest,
    /// What every run gets in its environment.
    env: Vec<(String, String)>,
    /// Where a step's rendered files are written before they go in.
    host_dir: PathBuf,
    opts: &'a BuildOptions,
    out_dir: &'a std::path::Path,
    /// The build VM's disks for a debug shell: (serial, what it holds).
    disks: Vec<(String, &'static str)>,
}

impl StepRunner<'_> {
    /// Puts the step's files in, then runs its scripts in order, stopping
    /// at the first that fails. Returns the lines it printed that start
    /// with `KILN_` (what a step tells kiln).
    fn run(&mut self, step: &Step, progress: &mut Progress) -> Result<Vec<String>> {
        let started = Instant::now();
        for f in &step.files {
            let host = self.host_dir.join(&f.name);
            std::fs::write(&host, &f.contents)?;
            self.guest
                .put_file(&host, &f.guest_path())
                .with_context(|| format!("step '{}': copying {} into the VM", step.name, f.name))?;
        }
        let log = std::cell::RefCell::new(StepLog::new(&step.name, self.opts.json));
        log.borrow_mut().echo = self.opts.verbose;
        for run in &step.runs {
            let mut env = self.env.clone();
            env.extend(run.env.iter().cloned());
            // Kept for a debug shell: it gets the failed run's environment.
            let env_of_run = env.clone();
            let outcome = self.guest.exec(
                ExecRequest {
                    id: 0,
                    argv: run.argv(),
                    env,
                    cwd: None,
                    stdin: false,
                    tty: None,
                },
                &mut LogWriter(&log),
                &mut LogWriter(&log),
            );
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) => {
                    log.borrow().bar.finish_and_clear();
                    return Err(e).with_context(|| format!("step '{}' failed", step.name));
                }
            };
            let limits = outcome.limits_note(self.opts.mem_mib);
            let code = match outcome {
                ExecOutcome::Exited { status, .. } => status.shell_code().unwrap_or(1),
                ExecOutcome::NotFound => 127,
                ExecOutcome::NotExecutable(_) => 126,
            };
            if code != 0 {
                let mut log = log.into_inner();
                log.bar.finish_and_clear();
                let tail = log.tail();
                if self.opts.debug_shell {
                    self.debug_shell(&step.name, code, &tail, env_of_run);
                }
                bail!(
                    "step '{}' failed with exit status {code}{}; its last output:\n{tail}\n\
                     (nothing was written to {})",
                    step.name,
                    limits.map(|n| format!(" ({n})")).unwrap_or_default(),
                    self.out_dir.display()
                );
            }
        }
        let log = log.into_inner();
        log.bar.finish_and_clear();
        progress.done(&step.name, started.elapsed());
        Ok(log.marks)
    }

    /// `--debug-shell`: a root shell in the build VM as the failed step
    /// left it, with its environment, until the user leaves it. The build
    /// then fails as it would have without one, so what goes wrong with
    /// the shell is only a warning.
    fn debug_shell(&mut self, step: &str, code: u8, tail: &str, env: Vec<(String, String)>) {
        // The agent refuses a working directory that does not exist (a
        // step before the tree was mounted failed, or the mount itself).
        let has_tree = guest_test(self.guest, "-d", plan::TREE);
        eprintln!("{}", debug_banner(step, code, tail, has_tree, &self.disks));
        let shell = self.guest.exec_on_terminal(ExecRequest {
            id: 0,
            argv: login_shell(),
            env,
            cwd: has_tree.then(|| plan::TREE.to_string()),
            stdin: true,
            tty: None,
        });
        if let Err(e) = shell {
            eprintln!("kiln: warning: the debug shell: {e:#}");
        }
    }
}

/// `test FLAG PATH` in the build VM: whether it succeeds.
fn guest_test(guest: &mut Guest, flag: &str, path: &str) -> bool {
    let r = guest.exec(
        ExecRequest {
            id: 0,
            argv: vec!["test".into(), flag.into(), path.into()],
            env: vec![],
            cwd: None,
            stdin: false,
            tty: None,
        },
        &mut std::io::sink(),
        &mut std::io::sink(),
    );
    matches!(r, Ok(ExecOutcome::Exited { status, .. }) if status.shell_code() == Some(0))
}

/// The installed packages of the finished tree in the build VM, or None
/// when it has no dpkg status (a root that is no Debian system).
fn tree_packages(guest: &mut Guest, host_dir: &Path) -> Result<Option<Packages>> {
    let status = guest_dpkg_status();
    if !guest_test(guest, "-f", &status) {
        return Ok(None);
    }
    let host = host_dir.join("dpkg-status");
    guest
        .get_file(&status, &host, false)
        .context("copying the image's dpkg status out of the VM")?;
    let bytes = std::fs::read(&host)?;
    let p = Packages::from_dpkg_status(&String::from_utf8_lossy(&bytes))
        .context("the image's /var/lib/dpkg/status")?;
    Ok(Some(p))
}

/// The last lines of a failed step's output the debug shell's banner shows.
const BANNER_TAIL_LINES: usize = 10;

/// What the debug shell's user needs to know first: what failed, and
/// where things are. `disks` are (serial, what it holds).
fn debug_banner(
    step: &str,
    code: u8,
    tail: &str,
    has_tree: bool,
    disks: &[(String, &str)],
) -> String {
    let lines: Vec<&str> = tail.lines().collect();
    let last = &lines[lines.len().saturating_sub(BANNER_TAIL_LINES)..];
    let mut b = format!("kiln: step '{step}' failed (exit status {code})");
    if last.is_empty() {
        b.push_str(", with no output\n");
    } else {
        b.push_str("; its last output:\n");
        for l in last {
            b.push_str(&format!("  | {l}\n"));
        }
    }
    b.push_str("kiln: debug shell in the build VM, with the step's environment.\n");
    if has_tree {
        b.push_str(&format!(
            "  the tree: {t}, as the step left it; `chroot {t}` enters it\n  \
             (the step's /proc, /sys and /dev mounts are undone)\n",
            t = plan::TREE
        ));
    } else {
        b.push_str(&format!(
            "  the tree: none yet ({} does not exist)\n",
            plan::TREE
        ));
    }
    b.push_str("  the disks:\n");
    let width = disks.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    for (serial, what) in disks {
        b.push_str(&format!(
            "    /dev/disk/by-id/virtio-{serial:<width$}  {what}\n"
        ));
    }
    b.push_str(
        "kiln: exit the shell (Ctrl-D or `exit`) to end the build; it fails as it would have.",
    );
    b
}

/// The contents of the recipe's `[[file]]` entries, in order.
fn recipe_file_contents(c: &Checked) -> Result<Vec<Vec<u8>>> {
    c.recipe
        .files
        .iter()
        .map(|f| match (&f.source, &f.content) {
            (Some(src), _) => std::fs::read(src)
                .with_context(|| format!("reading {} for {}", src.display(), f.path)),
            (None, Some(text)) => Ok(text.as_bytes().to_vec()),
            (None, None) => Ok(Vec::new()),
        })
        .collect()
}

const MIB: u64 = 1 << 20;

pub fn build(opts: BuildOptions) -> Result<()> {
    let c = Checked::load(&opts.recipe)?;
    let formats: Vec<Format> = {
        let mut f = if opts.formats.is_empty() {
            c.formats()
        } else {
            opts.formats.clone()
        };
        f.sort();
        f.dedup();
        f
    };
    let needs_disk = formats.iter().any(|f| *f != Format::Iso);
    if needs_disk && c.disk_size == 0 {
        bail!(
            "{}: format {} needs a disk image, but the recipe has no size and partitions \
             (it is for: iso)",
            c.file.display(),
            formats
                .iter()
                .filter(|f| **f != Format::Iso)
                .map(|f| f.ext())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let epoch = epoch(&c)?;
    let lock_file = lock::lock_path(&c.file);
    let lock = if opts.locked {
        Some(lock::read(&lock_file)?)
    } else {
        None
    };
    let created = !opts.out_dir.exists();
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating output directory {}", opts.out_dir.display()))?;
    let out_dir = opts
        .out_dir
        .canonicalize()
        .with_context(|| format!("output directory {}", opts.out_dir.display()))?;
    if let Some(b) = &c.recipe.output.qcow2_backing {
        output::check_backing_is_kept(b, &out_dir, &c.name, &formats, c.recipe.output.compress)?;
    }
    // What builds killed outright left here.
    owned_dir::sweep(&out_dir, |n| n.starts_with(WORK_PREFIX));
    let _remove_if_empty = RemoveIfEmpty(created.then(|| out_dir.clone()));
    // Scratch space beside the outputs: /tmp may be a small tmpfs. Every
    // partial output is made in it too, so whatever way the build ends,
    // none stays behind.
    let work = OwnedDir::new_in(&out_dir, WORK_PREFIX)
        .with_context(|| format!("creating a work directory in {}", out_dir.display()))?;
    let outputs_dir = work.path().join("outputs");
    std::fs::create_dir(&outputs_dir)?;
    let mut progress = Progress {
        json: opts.json,
        times: Vec::new(),
    };
    if !opts.json {
        eprintln!(
            "kiln build {} -> {} ({}; SOURCE_DATE_EPOCH={epoch})",
            c.name,
            out_dir.display(),
            formats
                .iter()
                .map(|f| f.ext())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let root = progress.host("root filesystem", || {
        rootfs::prepare(&c.root, epoch, work.path(), opts.fresh, opts.json).map_err(interrupted_or)
    })?;
    // Without commands the bootstrap's packages are the image's: check
    // them now, before the long work in the VM. Commands may install,
    // upgrade or remove packages: those images are checked once the tree
    // is finished.
    if let Some(lock) = &lock {
        if matches!(c.root, RootSource::Debian { .. }) && c.recipe.commands.is_empty() {
            let now = progress.host("check lock", || lock::archive_packages(&root.path))?;
            lock::check(&now, lock, &lock_file, "the bootstrap's packages", &out_dir)?;
        }
    }

    let ids = ids::Ids::for_recipe(&c);
    let parts = if needs_disk {
        plan::plan_partitions(&c, &ids)
    } else {
        vec![]
    };
    let iso_id = ids.uuid("iso");
    let plan = plan::Inputs {
        recipe: &c,
        epoch,
        parts: &parts,
        formats: &formats,
        iso_id: &iso_id,
    };

    // The tools image's mke2fs, unpacked before the VM: it makes the tree,
    // and the image's ext4 filesystems after the VM. The image stays held
    // for the whole build, as the VM's own use holds it: no gc removes it
    // meanwhile.
    let (host_tools, tools_sha256, _tools_held) = progress.host("tools for the host", || {
        let (image, held) = tools::locate(None, &tools::Extra::default())?;
        let sha256 = tools::image_sha256(&image)?;
        Ok((HostTools::of_image(&image, &sha256)?, sha256, held))
    })?;

    // The tree's layers: each step's key, and the longest run of them from
    // the first that the cache has (none with --fresh).
    let tree_steps = plan.tree_steps();
    let env = plan.env();
    let recipe_files = recipe_file_contents(&c)?;
    let keys = keys::keys(
        &keys::Base {
            root: &root.identity,
            tools: &tools_sha256,
            env: &env,
            files: &recipe_files,
            scripts: &[plan::Script::Common.text(), plan::Script::MountRoot.text()],
        },
        &tree_steps,
    );
    let layer_store = store::Store::open()?;
    let mut cached: Vec<store::Layer> = Vec::new();
    if !opts.fresh {
        for k in &keys {
            match layer_store.get(k) {
                Some(l) => cached.push(l),
                None => break,
            }
        }
    }
    let reused = cached.len();
    // Every layer's archive, oldest first: the build's own copies, of the
    // cache's and of those it makes. The VM and the merge read the same
    // bytes, whatever another kiln does to the cache meanwhile.
    let mut layers: Vec<PathBuf> = Vec::new();
    for (i, l) in cached.iter().enumerate() {
        let own = work.path().join(format!("reused-{i}.tar"));
        std::fs::copy(&l.archive, &own)
            .with_context(|| format!("copying the cached layer {}", l.archive.display()))?;
        layers.push(own);
    }

    // The disks: the image being built, the tree, scratch space for its
    // copies, the ext4 trees going out, and where the iso lands.
    let raw = work.path().join("disk.raw");
    let mut disks = Vec::new();
    if needs_disk {
        std::fs::File::create(&raw)?.set_len(c.disk_size)?;
        disks.push(DiskConfig {
            path: raw.clone(),
            format: DiskFormat::Raw,
            read_only: false,
            serial: plan::TARGET_SERIAL.into(),
        });
    }
    let gib = 1u64 << 30;
    // The tree with room for what commands add, and beside it on scratch
    // its frozen squashfs copies and an iso: generous, as the files are
    // sparse; a compressed archive unpacks to several times its size.
    let factor = if root.tar_flag.is_empty() { 4 } else { 16 };
    let room = ((root.size.saturating_mul(factor) + 4 * gib).max(c.disk_size * 2 + gib))
        .div_ceil(gib)
        * gib;
    let started = Instant::now();
    let base = base::base_tree(
        &host_tools,
        &tools_sha256,
        &base::Root {
            tar: &root.pinned(),
            size: root.size,
            compressed: !root.tar_flag.is_empty(),
            identity: &root.identity,
            origin: &root.origin,
            epoch,
        },
    )
    .map_err(interrupted_or)
    .context("step 'root tree' failed")?;
    if base.made {
        progress.done("root tree", started.elapsed());
    } else {
        progress.reused("root tree");
    }
    disks.push(DiskConfig {
        path: base.image.clone(),
        format: DiskFormat::Raw,
        read_only: true,
        serial: plan::TREE_SERIAL.into(),
    });
    // The package cache for commands that download (apt in the tree).
    let apt_cache = match &c.root {
        RootSource::Debian { mirror, .. } if tree_steps[reused..].iter().any(Step::has_network) => {
            let base = lock::archive_packages(&root.path).unwrap_or_default();
            Some(AptCache::open(mirror, &base, work.path())?)
        }
        _ => None,
    };
    // The layers disk: the layers reused, the packages offered to the
    // commands, then room for what the steps write.
    let layers_disk = work.path().join("layers.img");
    let mut archives: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
    archives.extend(apt_cache.as_ref().map(|a| a.archive.as_path()));
    let given_size: u64 = archives
        .iter()
        .map(|l| std::fs::metadata(l).map(|m| m.len().div_ceil(MIB) * MIB))
        .sum::<std::io::Result<u64>>()?;
    std::fs::File::create(&layers_disk)?.set_len(given_size + room)?;
    let (mut reused_spans, layers_next) = store::lay_out(&archives, &layers_disk)?;
    let debs_span = match apt_cache {
        Some(_) => reused_spans.pop(),
        None => None,
    };
    disks.push(DiskConfig {
        path: layers_disk.clone(),
        format: DiskFormat::Raw,
        read_only: false,
        serial: plan::LAYERS_SERIAL.into(),
    });
    // Beside the output steps' copies, it holds every layer unpacked and
    // the packages offered to the commands: as much again (sparse).
    let scratch = work.path().join("scratch.img");
    std::fs::File::create(&scratch)?.set_len(2 * room + given_size)?;
    disks.push(DiskConfig {
        path: scratch,
        format: DiskFormat::Raw,
        read_only: false,
        serial: plan::SCRATCH_SERIAL.into(),
    });
    // The ext4 trees, as tars for the host (sparse: only what is written
    // takes space).
    let trees = work.path().join("trees.img");
    let host_ext4 = plan.host_ext4();
    let trees_size = plan.trees_disk_size();
    if trees_size > 0 {
        std::fs::File::create(&trees)?.set_len(trees_size)?;
        disks.push(DiskConfig {
            path: trees.clone(),
            format: DiskFormat::Raw,
            read_only: false,
            serial: plan::TREES_SERIAL.into(),
        });
    }
    let iso_disk = work.path().join("iso.img");
    if formats.contains(&Format::Iso) {
        std::fs::File::create(&iso_disk)?
            // As large as the tree may grow (the archive may be compressed):
            // sparse, and cut to the iso's size after.
            .set_len(room)?;
        disks.push(DiskConfig {
            path: iso_disk.clone(),
            format: DiskFormat::Raw,
            read_only: false,
            serial: plan::ISO_SERIAL.into(),
        });
    }

    let disk_purposes: Vec<(String, &'static str)> = disks
        .iter()
        .map(|d| (d.serial.clone(), plan::disk_purpose(&d.serial)))
        .collect();
    let mut guest = progress.host("boot build VM", || {
        Guest::boot(GuestConfig {
            disks,
            shares: vec![],
            mem_mib: opts.mem_mib,
            cpus: opts.cpus,
            console: false,
            backend: opts.backend,
            kernel: None,
            kernel_args: None,
            tools: None,
            timeout: opts.timeout,
            boot_timeout: 120.0,
            // Hermetic unless a command asks for the network: the root
            // was bootstrapped on the host, and the other commands run
            // in a network namespace of their own (command.sh).
            net: c.needs_network(),
        })
    })?;

    // The recipe's files and the step scripts, then the steps.
    let files_dir = work.path().join("files");
    std::fs::create_dir_all(&files_dir)?;
    for (i, f) in c.recipe.files.iter().enumerate() {
        let host = match (&f.source, &f.content) {
            (Some(src), _) => src.clone(),
            (None, Some(text)) => {
                let p = files_dir.join(i.to_string());
                std::fs::write(&p, text)?;
                p
            }
            (None, None) => continue,
        };
        guest
            .put_file(&host, &plan::file_slot(i))
            .with_context(|| format!("copying file[{i}] ({}) into the VM", f.path))?;
    }
    for s in plan::Script::ALL {
        let host = files_dir.join(s.file_name());
        std::fs::write(&host, s.text())?;
        guest
            .put_file(&host, &s.guest_path())
            .with_context(|| format!("copying the step script {} into the VM", s.file_name()))?;
    }
    let mut env = env;
    env.push(("KILN_DEBS_MARK".into(), apt_cache::DEBS_MARK.into()));
    if let Some(span) = debs_span {
        // Not in the layers' keys: a layer is the same with or without it.
        env.push(("KILN_DEBS".into(), format!("{}:{}", span.offset, span.size)));
    }
    let mut runner = StepRunner {
        guest: &mut guest,
        env,
        host_dir: files_dir,
        opts: &opts,
        out_dir: &out_dir,
        disks: disk_purposes,
    };
    let mut marks = Vec::new();
    runner.run(&plan.mount_root(&reused_spans, layers_next), &mut progress)?;
    for (i, (step, key)) in tree_steps.iter().zip(&keys).enumerate() {
        if i < reused {
            progress.reused(&step.name);
            marks.extend(cached[i].marks.iter().cloned());
            continue;
        }
        let said = runner.run(step, &mut progress)?;
        let Some(span) = mark(&said, plan::LAYER_MARK).and_then(LayerSpan::parse) else {
            bail!("step '{}' did not say where its layer is", step.name);
        };
        // What a command downloaded: taken in now, as its place on the
        // layers disk is the build's, not the layer's.
        if let (Some(a), Some(v)) = (&apt_cache, mark(&said, apt_cache::DEBS_MARK)) {
            let Some(span) = LayerSpan::parse(v) else {
                bail!("step '{}' said '{v}' for its downloads", step.name);
            };
            let own = work.path().join(format!("debs-{i}.tar"));
            store::copy_span(&layers_disk, span, &own)?;
            a.take(&own)?;
        }
        let told: Vec<String> = said
            .into_iter()
            .filter(|m| !m.starts_with(plan::LAYER_MARK) && !m.starts_with(apt_cache::DEBS_MARK))
            .collect();
        let own = work.path().join(format!("layer-{i}.tar"));
        store::copy_span(&layers_disk, span, &own)?;
        // Kept at once: a later step that fails does not lose it.
        layer_store
            .put(key, &own, &told, opts.fresh)
            .with_context(|| format!("keeping step '{}''s layer in the cache", step.name))?;
        marks.extend(told);
        layers.push(own);
    }
    let kernel = mark(&marks, plan::KERNEL_MARK);
    // The tree is final: what it has installed is the image's manifest.
    let installed = tree_packages(runner.guest, &runner.host_dir)?;
    if let Some(lock) = &lock {
        let Some(now) = &installed else {
            bail!(
                "--locked: the image has no dpkg status ({}), so there are no packages \
                 to check against {}",
                "/var/lib/dpkg/status",
                lock_file.display()
            );
        };
        lock::check(now, lock, &lock_file, "the image's packages", &out_dir)?;
    }
    for step in plan.output_steps(kernel)? {
        marks.extend(runner.run(&step, &mut progress)?);
    }
    let root_layer = match mark(&marks, plan::ROOT_LAYER_MARK) {
        Some(v) => {
            let Some(span) = LayerSpan::parse(v) else {
                bail!("the filesystems step said '{v}' for the root's layer");
            };
            let path = work.path().join("root-layer.tar");
            store::copy_span(&layers_disk, span, &path)?;
            Some(path)
        }
        None => None,
    };
    let iso_size = match mark(&marks, plan::ISO_SIZE_MARK) {
        Some(size) => Some(size.parse::<u64>().context("the iso step's size")?),
        None => None,
    };
    progress.host("power off", || guest.shutdown())?;
    let command_debs = match apt_cache {
        Some(a) => {
            let report = a.keep(installed.as_ref())?;
            if !opts.json {
                eprintln!("commands: {}", report.summary());
            }
            Some(report)
        }
        None => None,
    };
    if !host_ext4.is_empty() {
        progress.host("ext4 filesystems", || {
            // The root: the root archive, every layer, and the output
            // steps' layer over them.
            let base = root.plain(work.path())?;
            let mut stack: Vec<&Path> = vec![&base];
            stack.extend(layers.iter().map(PathBuf::as_path));
            stack.extend(root_layer.as_deref());
            for fs in &host_ext4 {
                if ctrl_c::requested() {
                    bail!(SandboxError::Interrupted);
                }
                if fs.source == plan::Ext4Source::Layers && root_layer.is_none() {
                    bail!("the filesystems step did not say where the root's layer is");
                }
                ext4::make(&host_tools, fs, &raw, &trees, &stack, epoch).map_err(interrupted_or)?;
            }
            // Read: the disk space they took goes back before the outputs
            // are written.
            for disk in [&trees, &layers_disk] {
                if disk.exists() {
                    std::fs::remove_file(disk)
                        .with_context(|| format!("removing {}", disk.display()))?;
                }
            }
            Ok(())
        })?;
    }

    if let Some(size) = iso_size {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&iso_disk)?
            .set_len(size)?;
    } else if formats.contains(&Format::Iso) {
        bail!("the live iso step did not report the iso's size");
    }

    let conv = output::Converter {
        out_dir: &out_dir,
        name: &c.name,
        temp_dir: &outputs_dir,
        epoch,
        compress: c.recipe.output.compress,
        qcow2_backing: c.recipe.output.qcow2_backing.as_deref(),
        disk_size: c.disk_size,
    };
    let mut outputs = Vec::new();
    // raw last: it is the built disk itself, moved, once the others are made.
    let mut order = formats.clone();
    order.sort_by_key(|f| *f == Format::Raw);
    std::thread::scope(|s| -> Result<()> {
        // The raw output's SHA-256, taken meanwhile on the other core
        // (the disk no longer changes; qemu-img reads it too).
        let mut raw_sha256 = (formats.contains(&Format::Raw) && conv.keeps_raw_as_is())
            .then(|| s.spawn(|| output::sha256_file(&raw)));
        for f in &order {
            if ctrl_c::requested() {
                bail!(SandboxError::Interrupted);
            }
            let iso = iso_size.map(|_| iso_disk.as_path());
            let hashing = raw_sha256.take_if(|_| *f == Format::Raw);
            let o = progress.host(&format!("write {}", f.ext()), || {
                let known = match hashing {
                    Some(h) => Some(
                        h.join()
                            .map_err(|_| anyhow::anyhow!("hashing the raw image panicked"))??,
                    ),
                    None => None,
                };
                conv.make(*f, &raw, iso, known).map_err(interrupted_or)
            })?;
            outputs.push(o);
        }
        Ok(())
    })?;
    // All complete: now they take their final names.
    let sums = outputs
        .iter()
        .map(|o| output::write_sha256(o, &outputs_dir))
        .collect::<Result<Vec<_>>>()?;
    // NAME.packages, published with the outputs. No `.sha256`: it is a
    // listing to read and diff, not an artifact to deploy.
    let manifest_final = out_dir.join(format!("{}.packages", c.name));
    let manifest = match &installed {
        Some(p) => {
            let tmp = outputs_dir.join(format!("{}.packages", c.name));
            std::fs::write(&tmp, p.to_list())?;
            Some(tmp)
        }
        None => None,
    };
    if ctrl_c::requested() {
        bail!(SandboxError::Interrupted);
    }
    let mut summary = Vec::new();
    for (o, (sum_tmp, sum_final)) in outputs.iter().zip(sums) {
        std::fs::rename(&o.temp, &o.final_path)
            .with_context(|| format!("writing {}", o.final_path.display()))?;
        std::fs::rename(&sum_tmp, &sum_final)?;
        summary.push(OutputSummary {
            format: o.format.ext().to_string(),
            path: o.final_path.clone(),
            size: o.size,
            sha256: o.sha256.clone(),
        });
    }
    match &manifest {
        Some(tmp) => std::fs::rename(tmp, &manifest_final)
            .with_context(|| format!("writing {}", manifest_final.display()))?,
        // An earlier build's manifest would describe other outputs.
        None => {
            let _ = std::fs::remove_file(&manifest_final);
        }
    }
    let lock_written = match (&installed, opts.locked) {
        (Some(now), false) => lock::update(&c.file, &c.name, now, opts.json),
        (Some(_), true) => true,
        (None, _) => false,
    };
    if opts.json {
        let layer_report: Vec<_> = tree_steps
            .iter()
            .zip(&keys)
            .enumerate()
            .map(|(i, (s, k))| serde_json::json!({"step": s.name, "key": k, "reused": i < reused}))
            .collect();
        let v = serde_json::json!({
            "recipe": c.file,
            "layers": layer_report,
            "name": c.name,
            "source_date_epoch": epoch,
            "root_archive": root.path,
            "debs": root.debs,
            "command_debs": command_debs,
            "outputs": summary,
            "packages": manifest.is_some().then_some(&manifest_final),
            "lock": lock_written.then_some(&lock_file),
            "steps": progress.times,
        });
        println!("{v}");
    } else {
        for s in &summary {
            println!("{}  {} ({} bytes)", s.sha256, s.path.display(), s.size);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_debug_banner_names_the_step_its_output_the_tree_and_the_disks() {
        let tail: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let disks = [
            (plan::TARGET_SERIAL.to_string(), "the image"),
            (plan::SCRATCH_SERIAL.to_string(), "scratch"),
        ];
        let b = debug_banner("command 2", 1, &tail, true, &disks);
        assert!(
            b.starts_with("kiln: step 'command 2' failed (exit status 1)"),
            "{b}"
        );
        assert!(
            b.contains("  | line 19\n") && b.contains("  | line 10\n"),
            "{b}"
        );
        assert!(!b.contains("line 9\n"), "only the last lines: {b}");
        assert!(b.contains("`chroot /build/root`"), "{b}");
        assert!(
            b.contains("/dev/disk/by-id/virtio-kiln-target   the image\n"),
            "{b}"
        );
        assert!(
            b.contains("/dev/disk/by-id/virtio-kiln-scratch  scratch\n"),
            "{b}"
        );
        let b = debug_banner("mount root", 2, "", false, &disks);
        assert!(b.contains("with no output"), "{b}");
        assert!(b.contains("none yet"), "{b}");
    }

    #[test]
    fn a_step_keeps_its_last_lines_and_an_unfinished_one() {
        let mut log = StepLog::new("step", true);
        let text: String = (0..40).map(|i| format!("line {i}\n\n")).collect();
        log.take(text.as_bytes());
        log.take(b"no newline");
        assert_eq!(log.lines.iter().count(), STEP_TAIL_LINES);
        let tail = log.tail();
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), STEP_TAIL_LINES + 1);
        assert_eq!(lines[0], "line 10");
        assert_eq!(lines[STEP_TAIL_LINES - 1], "line 39");
        assert_eq!(lines[STEP_TAIL_LINES], "no newline");
    }
}
