//! Rebuild benchmark: `cargo bench --bench rebuild [-- RUNS]` (default 3).
//!
//! What a user pays when they change `images/debian-bookworm-minimal.toml`
//! and build again, against a full build with a fresh bootstrap measured in
//! the same run (interleaved, one shared cache):
//!
//! 1. a full build (`--fresh`: the bootstrap runs again);
//! 2. a rebuild after changing the last command;
//! 3. a rebuild after adding a file;
//! 4. a rebuild after adding one package (a new bootstrap, its packages
//!    from the package cache but the new ones), with what it downloaded;
//! 5. the disk space of 5 variants that differ in their last command: one
//!    raw image and four qcow2 overlays on it (`qcow2_backing`), against
//!    five raw images.
//!
//! Figures, not tests: nothing here fails on speed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[path = "support/kiln_build.rs"]
mod kiln_build;
use kiln_build::{fail, kiln_build, median};

/// The minimal recipe, changed by `edit`, written as `name` in `dir`.
fn variant(
    base: &toml::Table,
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut toml::Table),
) -> PathBuf {
    let mut t = base.clone();
    edit(&mut t);
    let path = dir.join(format!("{name}.toml"));
    let text = toml::to_string(&t).unwrap_or_else(|e| fail(&format!("recipe: {e}")));
    std::fs::write(&path, text).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
    path
}

fn array<'a>(t: &'a mut toml::Table, key: &str) -> &'a mut Vec<toml::Value> {
    t.entry(key)
        .or_insert_with(|| toml::Value::Array(vec![]))
        .as_array_mut()
        .unwrap_or_else(|| fail(&format!("the recipe's {key} is not a list")))
}

fn add_command(t: &mut toml::Table, command: &str) {
    array(t, "commands").push(command.into());
}

/// Builds `recipe` into `out`: its seconds and `--json`.
fn build(recipe: &Path, out: &Path, extra: &[&str]) -> (f64, serde_json::Value) {
    let (took, v) = kiln_build(recipe, out, extra);
    (took.as_secs_f64(), v)
}

/// The bytes `path` takes on disk (the images are sparse).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())))
        .blocks()
        * 512
}

/// The path of the output of `format` a build reported.
fn output(v: &serde_json::Value, format: &str) -> PathBuf {
    v["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["format"] == format))
        .and_then(|o| o["path"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| fail(&format!("no {format} output reported")))
}

/// Each step's seconds in one build, for saying where the time goes.
fn steps(v: &serde_json::Value) -> String {
    v["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter(|s| s["seconds"].as_f64().is_some_and(|t| t >= 0.5))
                .map(|s| format!("{} {}", s["step"].as_str().unwrap_or("?"), s["seconds"]))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3)
        .max(1);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let minimal = repo.join("images/debian-bookworm-minimal.toml");
    let base: toml::Table = std::fs::read_to_string(&minimal)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", minimal.display())))
        .parse()
        .unwrap_or_else(|e| fail(&format!("{}: {e}", minimal.display())));
    let work = tempfile::Builder::new()
        .prefix("kiln-rebuild-bench-")
        .tempdir_in(repo.join("target"))
        .unwrap_or_else(|e| fail(&e.to_string()));
    let dir = work.path();
    // Small packages that minbase leaves out, one per run, so that each
    // run's bootstrap is new (the package cache may hold them already).
    const PACKAGES: &[&str] = &["bc", "pv", "tree", "less", "file"];

    let (mut full, mut command, mut file, mut package) = (vec![], vec![], vec![], vec![]);
    let mut where_command = String::new();
    let mut downloads = Vec::new();
    for i in 0..runs {
        let (t, _) = build(&minimal, &dir.join("full"), &["--fresh"]);
        full.push(t);

        let r = variant(&base, dir, &format!("command-{i}"), |t| {
            add_command(t, &format!("echo rebuild-{i} > /etc/kiln-bench"));
        });
        let (t, v) = build(&r, &dir.join("command"), &[]);
        command.push(t);
        where_command = steps(&v);

        let r = variant(&base, dir, &format!("file-{i}"), |t| {
            let mut f = toml::Table::new();
            f.insert("path".into(), "/etc/kiln-bench".into());
            f.insert("content".into(), format!("rebuild-{i}\n").into());
            array(t, "file").push(f.into());
        });
        let (t, _) = build(&r, &dir.join("file"), &[]);
        file.push(t);

        let pkg = PACKAGES[i % PACKAGES.len()];
        let r = variant(&base, dir, &format!("package-{i}"), |t| {
            let root = t
                .get_mut("root")
                .and_then(|r| r.as_table_mut())
                .unwrap_or_else(|| fail("the recipe has no [root]"));
            array(root, "packages").push(pkg.into());
        });
        // --fresh: an earlier run of this bench cached this bootstrap.
        let (t, v) = build(&r, &dir.join("package"), &["--fresh"]);
        package.push(t);
        let got = &v["debs"]["downloaded"];
        downloads.push(format!("+{pkg}: downloaded {got}"));
        eprintln!(
            "run {}: full {:.1} s, command {:.1} s, file {:.1} s, package {:.1} s",
            i + 1,
            full[i],
            command[i],
            file[i],
            package[i]
        );
    }

    // 5 variants differing in their last command: the first a raw image,
    // the others qcow2 overlays on it.
    let first = variant(&base, dir, "variant-0", |t| {
        add_command(t, "echo variant-0 > /etc/kiln-bench");
        t.insert(
            "output".into(),
            toml::Table::from_iter([("formats".into(), vec!["raw"].into())]).into(),
        );
    });
    let (_, v) = build(&first, &dir.join("variant-0"), &[]);
    let raw = output(&v, "raw");
    let one = allocated(&raw);
    let mut shared = one;
    for n in 1..5 {
        let r = variant(&base, dir, &format!("variant-{n}"), |t| {
            add_command(t, &format!("echo variant-{n} > /etc/kiln-bench"));
            let mut o = toml::Table::new();
            o.insert("formats".into(), vec!["qcow2"].into());
            o.insert(
                "qcow2_backing".into(),
                raw.to_string_lossy().into_owned().into(),
            );
            t.insert("output".into(), o.into());
        });
        let (_, v) = build(&r, &dir.join(format!("variant-{n}")), &[]);
        shared += allocated(&output(&v, "qcow2"));
    }

    let f = median(&mut full);
    let row = |what: &str, v: &mut Vec<f64>| {
        let m = median(v);
        println!("  {what:<34} {m:>7.1} s   {:>5.2} of a full build", m / f);
    };
    println!("kiln build images/debian-bookworm-minimal.toml, changed, {runs} runs (medians):");
    println!("  {:<34} {f:>7.1} s", "full build (--fresh bootstrap)");
    row("rebuild, last command changed", &mut command);
    row("rebuild, a file added", &mut file);
    row("rebuild, a package added (--fresh)", &mut package);
    println!("  where a last-command rebuild's time goes: {where_command}");
    for d in &downloads {
        println!("  {d}");
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("5 variants differing in their last command, disk space:");
    println!("  one raw image                    {:>9.1} MiB", mib(one));
    println!(
        "  5 raw images                     {:>9.1} MiB",
        mib(5 * one)
    );
    println!(
        "  1 raw + 4 qcow2 overlays on it   {:>9.1} MiB   {:.2} of one",
        mib(shared),
        shared as f64 / one as f64
    );
}
