//! `kiln cache ls|gc`: the cache's entries, and pruning them.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::sandbox::cache;
use crate::util::size;

/// What `kiln cache gc` removes when told neither `--keep` nor
/// `--older-than`: entries unused for this many days. A month keeps what
/// any regular work uses (a kernel takes minutes to build again, a tools
/// image a minute or two), while what an old kiln version or a one-off
/// `--tools-package` left goes without the user having to pick a size.
pub const DEFAULT_OLDER_THAN_DAYS: u64 = 30;

#[derive(Subcommand)]
pub enum CacheAction {
    /// List the entries: kind, key, size on disk, last use.
    Ls {
        /// Print the cache as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove entries, least recently used first, and what interrupted
    /// builds left. Never removes what a running kiln uses. With neither
    /// --keep nor --older-than: entries unused for 30 days.
    Gc {
        /// Remove entries until they take at most this much (e.g. 10G,
        /// 500M; a bare number counts bytes).
        #[arg(long, value_name = "SIZE", value_parser = parse_keep)]
        keep: Option<u64>,
        /// Remove entries unused for more than this many days.
        #[arg(long, value_name = "DAYS")]
        older_than: Option<u64>,
        /// Say what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_keep(s: &str) -> Result<u64, String> {
    let (n, unit) = size::parse(s.trim())
        .ok_or_else(|| format!("expected a size such as 10G or 500M, got '{s}'"))?;
    n.checked_mul(unit.bytes())
        .ok_or_else(|| format!("size '{s}' is too large"))
}

pub fn cache(action: CacheAction) -> Result<u8> {
    let root = cache::root()?;
    match action {
        CacheAction::Ls { json } => {
            let entries = cache::list(&root)?;
            let total: u64 = entries.iter().map(|e| e.size).sum();
            if json {
                let v = serde_json::json!({ "root": root, "entries": entries, "total": total });
                println!("{v}");
            } else {
                println!("cache: {}", root.display());
                print_table(&entries, SystemTime::now());
                println!(
                    "{} in {} entr{}",
                    human(total),
                    entries.len(),
                    if entries.len() == 1 { "y" } else { "ies" }
                );
            }
        }
        CacheAction::Gc {
            keep,
            older_than,
            dry_run,
            json,
        } => {
            let older_than = match (keep, older_than) {
                (None, None) => Some(DEFAULT_OLDER_THAN_DAYS),
                (_, days) => days,
            };
            let policy = cache::Policy {
                keep,
                older_than: older_than.map(|d| Duration::from_secs(d.saturating_mul(24 * 60 * 60))),
                dry_run,
            };
            let report = cache::gc(&root, &policy, SystemTime::now())
                .with_context(|| format!("pruning the cache {}", root.display()))?;
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["root"] = serde_json::json!(root);
                println!("{v}");
            } else {
                print_report(&report, &root);
            }
        }
    }
    Ok(0)
}

fn print_table(entries: &[cache::Entry], now: SystemTime) {
    if entries.is_empty() {
        return;
    }
    let key_width = entries
        .iter()
        .map(|e| e.key.len())
        .max()
        .unwrap_or(0)
        .max(3);
    println!(
        "{:<10} {:<key_width$} {:>10}  LAST USED",
        "KIND", "KEY", "SIZE"
    );
    for e in entries {
        println!(
            "{:<10} {:<key_width$} {:>10}  {}{}",
            e.kind,
            e.key,
            human(e.size),
            ago(e.last_used, now),
            if e.in_use { " (in use)" } else { "" }
        );
    }
}

fn print_report(r: &cache::Report, root: &std::path::Path) {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    let now = SystemTime::now();
    for e in &r.removed {
        println!(
            "{verb} {} {} ({}, last used {})",
            e.kind,
            e.key,
            human(e.size),
            ago(e.last_used, now)
        );
    }
    for e in &r.in_use {
        println!("kept {} {}: in use by a running kiln", e.kind, e.key);
    }
    if !r.leftovers.is_empty() {
        let bytes: u64 = r.leftovers.iter().map(|l| l.size).sum();
        println!(
            "{verb} {} leftover{} of interrupted builds ({})",
            r.leftovers.len(),
            if r.leftovers.len() == 1 { "" } else { "s" },
            human(bytes)
        );
    }
    let (freed, holds) = if r.dry_run {
        ("would free", "would then hold")
    } else {
        ("freed", "now holds")
    };
    println!(
        "{freed} {}; the cache {} {holds} {}",
        human(r.freed),
        root.display(),
        human(r.total)
    );
}

/// `bytes` in the largest binary unit that keeps a number of at least 1.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// How long ago the Unix time `t` was, roughly.
fn ago(t: u64, now: SystemTime) -> String {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(t);
    let (n, unit) = match s {
        0..=59 => return "just now".to_string(),
        60..=3599 => (s / 60, "minute"),
        3600..=86399 => (s / 3600, "hour"),
        _ => (s / 86400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_as_people_write_them() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(80 << 20), "80.0 MiB");
        assert_eq!(human(3 << 40), "3.0 TiB");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(ago(1_000_000, now), "just now");
        assert_eq!(ago(1_000_000 - 120, now), "2 minutes ago");
        assert_eq!(ago(1_000_000 - 3600, now), "1 hour ago");
        assert_eq!(ago(1_000_000 - 3 * 86400, now), "3 days ago");
        assert_eq!(parse_keep("10G"), Ok(10 << 30));
        assert_eq!(parse_keep("0"), Ok(0));
        assert!(parse_keep("10GB").is_err());
        assert!(parse_keep("99999999T").is_err());
    }
}
