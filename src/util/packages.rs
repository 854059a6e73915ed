//! The packages installed in an image: read from its dpkg status file,
//! written as `NAME.packages` beside the outputs and as `RECIPE.lock`
//! beside the recipe, and compared with a lock for `kiln build --locked`.
//!
//! Both files hold one `name version architecture` line per package,
//! sorted by name then architecture; the lock has a comment header
//! (`#` lines) that the reader skips.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What is wrong with a dpkg status file or a lock.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackagesError {
    #[error("line {line}: a continuation line with no field before it")]
    Continuation { line: usize },
    #[error("line {line}: not a 'Field: value' line: {text:?}")]
    NotAField { line: usize, text: String },
    #[error("the paragraph ending at line {line} has no {field} field")]
    MissingField { line: usize, field: &'static str },
    #[error("line {line}: '{text}' is not 'name version architecture'")]
    BadLockLine { line: usize, text: String },
    #[error("line {line}: {name}:{arch} is listed twice")]
    Duplicate {
        line: usize,
        name: String,
        arch: String,
    },
}

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub arch: String,
}

/// The installed packages, keyed (and so sorted) by name then architecture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packages(BTreeMap<(String, String), String>);

impl Packages {
    fn insert(&mut self, line: usize, p: Package) -> Result<(), PackagesError> {
        let key = (p.name, p.arch);
        if self.0.contains_key(&key) {
            return Err(PackagesError::Duplicate {
                line,
                name: key.0,
                arch: key.1,
            });
        }
        self.0.insert(key, p.version);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// (name, version, architecture) of each, by name then architecture.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.0
            .iter()
            .map(|((name, arch), version)| (name.as_str(), version.as_str(), arch.as_str()))
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The packages in /var/lib/dpkg/status (deb822 paragraphs) that are
    /// installed: the third word of their Status is `installed`, so held
    /// packages count, half-installed or removed ones do not.
    pub fn from_dpkg_status(text: &str) -> Result<Packages, PackagesError> {
        let mut out = Packages::default();
        for para in paragraphs(text)? {
            let installed =
                para.get("status").and_then(|s| s.split_whitespace().nth(2)) == Some("installed");
            if !installed {
                continue;
            }
            let field = |name: &'static str| {
                para.fields
                    .get(name)
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .ok_or(PackagesError::MissingField {
                        line: para.end,
                        field: match name {
                            "package" => "Package",
                            "version" => "Version",
                            _ => "Architecture",
                        },
                    })
            };
            let p = Package {
                name: field("package")?,
                version: field("version")?,
                arch: field("architecture")?,
            };
            out.insert(para.end, p)?;
        }
        Ok(out)
    }

    /// Reads a manifest or lock: `name version architecture` lines;
    /// blank lines and `#` comments are skipped.
    pub fn from_list(text: &str) -> Result<Packages, PackagesError> {
        let mut out = Packages::default();
        for (i, l) in text.lines().enumerate() {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = l.split_whitespace().collect();
            let [name, version, arch] = words[..] else {
                return Err(PackagesError::BadLockLine {
                    line: i + 1,
                    text: l.to_string(),
                });
            };
            out.insert(
                i + 1,
                Package {
                    name: name.to_string(),
                    version: version.to_string(),
                    arch: arch.to_string(),
                },
            )?;
        }
        Ok(out)
    }

    /// The manifest: one `name version architecture` line per package.
    pub fn to_list(&self) -> String {
        let mut s = String::new();
        for ((name, arch), version) in &self.0 {
            let _ = writeln!(s, "{name} {version} {arch}");
        }
        s
    }

    /// A lock: the manifest after a header saying what it is for.
    pub fn to_lock(&self, recipe_name: &str) -> String {
        format!(
            "# The packages kiln build installed for the recipe {recipe_name}, one\n\
             # 'name version architecture' per line. `kiln build --locked` refuses to\n\
             # build when the image's packages differ; a build without it rewrites this.\n{}",
            self.to_list()
        )
    }

    #[cfg(test)]
    pub fn get(&self, name: &str, arch: &str) -> Option<&str> {
        self.0
            .get(&(name.to_string(), arch.to_string()))
            .map(String::as_str)
    }

    /// How `self` (what a build installed) differs from `lock`.
    pub fn diff(&self, lock: &Packages) -> Vec<Change> {
        let mut changes = Vec::new();
        for ((name, arch), version) in &lock.0 {
            match self.0.get(&(name.clone(), arch.clone())) {
                None => changes.push(Change::Removed(pkg(name, version, arch))),
                Some(v) if v != version => changes.push(Change::Changed {
                    name: name.clone(),
                    arch: arch.clone(),
                    locked: version.clone(),
                    now: v.clone(),
                }),
                Some(_) => {}
            }
        }
        for ((name, arch), version) in &self.0 {
            if !lock.0.contains_key(&(name.clone(), arch.clone())) {
                changes.push(Change::Added(pkg(name, version, arch)));
            }
        }
        changes.sort_by(|a, b| a.key().cmp(&b.key()));
        changes
    }
}

fn pkg(name: &str, version: &str, arch: &str) -> Package {
    Package {
        name: name.to_string(),
        version: version.to_string(),
        arch: arch.to_string(),
    }
}

/// One difference between a build's packages and its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(Package),
    Removed(Package),
    Changed {
        name: String,
        arch: String,
        locked: String,
        now: String,
    },
}

impl Change {
    fn key(&self) -> (&str, &str) {
        match self {
            Change::Added(p) | Change::Removed(p) => (&p.name, &p.arch),
            Change::Changed { name, arch, .. } => (name, arch),
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added(p) => {
                write!(f, "+ {}:{} {} (not in the lock)", p.name, p.arch, p.version)
            }
            Change::Removed(p) => write!(
                f,
                "- {}:{} {} (locked, not installed)",
                p.name, p.arch, p.version
            ),
            Change::Changed {
                name,
                arch,
                locked,
                now,
            } => write!(f, "~ {name}:{arch} {locked} (locked) -> {now}"),
        }
    }
}

/// The changes as indented lines, at most `max` of them and a count of
/// the rest.
pub fn describe(changes: &[Change], max: usize) -> String {
    let mut s = String::new();
    for c in changes.iter().take(max) {
        let _ = writeln!(s, "  {c}");
    }
    if changes.len() > max {
        let _ = writeln!(s, "  ... and {} more", changes.len() - max);
    }
    s
}

/// A deb822 paragraph: its fields by lower-cased name, and the line it
/// ends on (for errors).
struct Paragraph {
    fields: BTreeMap<String, String>,
    end: usize,
}

impl Paragraph {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// Splits deb822 text into paragraphs. Field names are case-insensitive
/// (Debian policy 5.1); a continuation line (leading space or tab) adds
/// to the field before it.
fn paragraphs(text: &str) -> Result<Vec<Paragraph>, PackagesError> {
    let mut out = Vec::new();
    let mut fields = BTreeMap::new();
    let mut last: Option<String> = None;
    let mut end = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        end = line;
        if raw.trim().is_empty() {
            if !fields.is_empty() {
                out.push(Paragraph {
                    fields: std::mem::take(&mut fields),
                    end: line - 1,
                });
            }
            last = None;
            continue;
        }
        if raw.starts_with(' ') || raw.starts_with('\t') {
            let Some(name) = &last else {
                return Err(PackagesError::Continuation { line });
            };
            if let Some(v) = fields.get_mut(name) {
                v.push('\n');
                v.push_str(raw.trim());
            }
            continue;
        }
        // A '#' line outside a field is a comment in deb822.
        if raw.starts_with('#') {
            continue;
        }
        let Some((name, value)) = raw.split_once(':') else {
            return Err(PackagesError::NotAField {
                line,
                text: raw.chars().take(80).collect(),
            });
        };
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(PackagesError::NotAField {
                line,
                text: raw.chars().take(80).collect(),
            });
        }
        let name = name.to_ascii_lowercase();
        fields.insert(name.clone(), value.trim().to_string());
        last = Some(name);
    }
    if !fields.is_empty() {
        out.push(Paragraph { fields, end });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "\
Package: libc6
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u4
Description: GNU C Library: Shared libraries
 Contains the standard libraries.
 .
 More.

Package: base-files
Status: install ok installed
Architecture: amd64
Version: 12.4+deb12u5

Package: libc6
Status: hold ok installed
Architecture: i386
Version: 2.36-9+deb12u4

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: never
Status: purge ok not-installed
";

    #[test]
    fn installed_packages_are_read_and_listed_sorted_by_name_then_arch() {
        let p = Packages::from_dpkg_status(STATUS).expect("parse");
        assert_eq!(
            p.to_list(),
            "base-files 12.4+deb12u5 amd64\n\
             libc6 2.36-9+deb12u4 amd64\n\
             libc6 2.36-9+deb12u4 i386\n"
        );
        assert_eq!(p.get("base-files", "amd64"), Some("12.4+deb12u5"));
        assert_eq!(p.get("gone", "amd64"), None);
        // The list reads back as itself, and so does a lock.
        assert_eq!(Packages::from_list(&p.to_list()), Ok(p.clone()));
        assert_eq!(Packages::from_list(&p.to_lock("small")), Ok(p));
    }

    #[test]
    fn field_names_are_case_insensitive_and_crlf_and_no_final_newline_are_read() {
        let text = "package: a\r\nSTATUS: install ok installed\r\nversion: 1\r\narchitecture: all";
        let p = Packages::from_dpkg_status(text).expect("parse");
        assert_eq!(p.to_list(), "a 1 all\n");
        assert!(Packages::from_dpkg_status("").expect("empty").is_empty());
    }

    #[test]
    fn malformed_status_is_an_error_not_a_panic() {
        assert_eq!(
            Packages::from_dpkg_status(" continued\n").err(),
            Some(PackagesError::Continuation { line: 1 })
        );
        assert!(matches!(
            Packages::from_dpkg_status("Package: a\nno colon here\n"),
            Err(PackagesError::NotAField { line: 2, .. })
        ));
        assert!(matches!(
            Packages::from_dpkg_status(": empty name\n"),
            Err(PackagesError::NotAField { line: 1, .. })
        ));
        assert_eq!(
            Packages::from_dpkg_status(
                "Package: a\nStatus: install ok installed\nArchitecture: all\n"
            )
            .err(),
            Some(PackagesError::MissingField {
                line: 3,
                field: "Version"
            })
        );
        let twice = "Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: all\n\n\
                     Package: a\nStatus: install ok installed\nVersion: 2\nArchitecture: all\n";
        assert!(matches!(
            Packages::from_dpkg_status(twice),
            Err(PackagesError::Duplicate { .. })
        ));
        // Bytes that are no text at all: the caller reads lossily; odd
        // characters are just values.
        let odd = String::from_utf8_lossy(b"Package: \xff\nStatus: x\n").into_owned();
        assert!(Packages::from_dpkg_status(&odd).expect("parse").is_empty());
    }

    #[test]
    fn malformed_lock_lines_are_errors() {
        assert_eq!(
            Packages::from_list("# header\na 1 amd64\nb 2\n").err(),
            Some(PackagesError::BadLockLine {
                line: 3,
                text: "b 2".into()
            })
        );
        assert!(matches!(
            Packages::from_list("a 1 amd64\na 2 amd64\n"),
            Err(PackagesError::Duplicate { line: 2, .. })
        ));
        assert!(Packages::from_list("a 1 amd64 extra\n").is_err());
    }

    #[test]
    fn the_diff_names_added_removed_and_changed_packages_in_order() {
        let lock = Packages::from_list("a 1 amd64\nb 1 amd64\nc 1 all\n").expect("lock");
        let now = Packages::from_list("a 1 amd64\nb 2 amd64\nd 1 amd64\n").expect("now");
        let changes = now.diff(&lock);
        assert_eq!(
            changes,
            vec![
                Change::Changed {
                    name: "b".into(),
                    arch: "amd64".into(),
                    locked: "1".into(),
                    now: "2".into()
                },
                Change::Removed(pkg("c", "1", "all")),
                Change::Added(pkg("d", "1", "amd64")),
            ]
        );
        assert!(now.diff(&now).is_empty());
        let text = describe(&changes, 2);
        assert_eq!(
            text,
            "  ~ b:amd64 1 (locked) -> 2\n  - c:all 1 (locked, not installed)\n  ... and 1 more\n"
        );
        assert_eq!(
            Change::Added(pkg("d", "1", "amd64")).to_string(),
            "+ d:amd64 1 (not in the lock)"
        );
    }
}
