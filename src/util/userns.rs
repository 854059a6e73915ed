//! What an unprivileged user needs for mmdebstrap's unshare mode (the tools
//! image and `root.suite` bootstraps): newuidmap, a range of subordinate
//! user and group ids, and user namespaces the kernel lets them create.
//! Checked before a bootstrap starts, so that the answer names the fix
//! instead of ending in mmdebstrap's log.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Result};

use crate::util::which::which;

/// The ids unshare mode maps the image's users onto: 0..65535 at least.
const SUBIDS_NEEDED: u64 = 65536;

/// Checks that this user can bootstrap in unshare mode; `what` names the
/// job in the message ("the tools image", "root.suite").
pub fn check_unshare_mode(what: &str) -> Result<()> {
    if which("newuidmap").is_none() || which("newgidmap").is_none() {
        bail!(
            "newuidmap not found, needed to build {what} without root: \
             sudo apt-get install uidmap"
        );
    }
    let uid = rustix::process::getuid().as_raw();
    let name = user_name(
        uid,
        &std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
    );
    let shown = name.clone().unwrap_or_else(|| uid.to_string());
    for (file, kind) in [("/etc/subuid", "user"), ("/etc/subgid", "group")] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if !has_subids(&text, name.as_deref(), uid) {
            bail!(
                "building {what} without root needs {SUBIDS_NEEDED} subordinate {kind} ids \
                 for {shown} in {file}, and there are none (mmdebstrap's unshare mode maps \
                 the image's users onto them). As root, give {shown} a range no other user \
                 in /etc/subuid or /etc/subgid has, for example: sudo usermod \
                 --add-subuids 100000-165535 --add-subgids 100000-165535 {shown}"
            );
        }
    }
    let sysctl = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(why) = userns_blocked(
        sysctl("/proc/sys/user/max_user_namespaces"),
        sysctl("/proc/sys/kernel/unprivileged_userns_clone"),
        sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
    ) {
        bail!("building {what} without root needs user namespaces, but {why}");
    }
    // The settings above are the usual reasons; a probe catches the rest
    // (a seccomp policy, a container that forbids nesting).
    if Path::new("/usr/bin/unshare").exists() {
        let ok = Command::new("/usr/bin/unshare")
            .args(["--user", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!(
                "building {what} without root needs user namespaces, and this user cannot \
                 create one ('unshare --user true' fails); check the host's policy on \
                 unprivileged user namespaces, or build as root"
            );
        }
    }
    Ok(())
}

/// The login name of `uid` in passwd-format `text`.
fn user_name(uid: u32, passwd: &str) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

/// Whether subid-format `text` (`NAME_OR_UID:START:COUNT` lines) gives the
/// user at least [`SUBIDS_NEEDED`] ids in one range.
fn has_subids(text: &str, name: Option<&str>, uid: u32) -> bool {
    let uid = uid.to_string();
    text.lines().any(|l| {
        let mut f = l.trim().split(':');
        let (Some(owner), Some(_start), Some(count)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        (owner == uid || Some(owner) == name)
            && count.parse::<u64>().is_ok_and(|c| c >= SUBIDS_NEEDED)
    })
}

/// Why the kernel refuses unprivileged user namespaces, from its settings
/// (absent ones are `None`), with the command that allows them.
fn userns_blocked(
    max_user_namespaces: Option<u64>,
    unprivileged_userns_clone: Option<u64>,
    apparmor_restrict: Option<u64>,
) -> Option<String> {
    if max_user_namespaces == Some(0) {
        return Some(
            "they are disabled (user.max_user_namespaces = 0): \
             sudo sysctl -w user.max_user_namespaces=15000"
                .into(),
        );
    }
    if unprivileged_userns_clone == Some(0) {
        return Some(
            "unprivileged ones are disabled (kernel.unprivileged_userns_clone = 0): \
             sudo sysctl -w kernel.unprivileged_userns_clone=1"
                .into(),
        );
    }
    if apparmor_restrict == Some(1) {
        return Some(
            "AppArmor restricts unprivileged ones \
             (kernel.apparmor_restrict_unprivileged_userns = 1, as on Ubuntu 24.04): \
             allow mmdebstrap and newuidmap with an AppArmor profile that grants userns, \
             or sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
                .into(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_users_subordinate_ids_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:165536:65536\nshort:231072:1000\n";
        assert!(has_subids(text, Some("alice"), 1000));
        assert!(has_subids(text, Some("bob"), 1001));
        assert!(!has_subids(text, Some("carol"), 1002));
        assert!(!has_subids(text, None, 1002));
        // Too few ids for unshare mode.
        assert!(!has_subids(text, Some("short"), 1003));
        assert!(!has_subids(
            "garbage\n::\nalice:1:lots\n",
            Some("alice"),
            1000
        ));
        assert!(!has_subids("", Some("alice"), 1000));
    }

    #[test]
    fn names_users_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nci:x:1000:1000::/home/ci:/bin/sh\n";
        assert_eq!(user_name(1000, passwd).as_deref(), Some("ci"));
        assert_eq!(user_name(0, passwd).as_deref(), Some("root"));
        assert_eq!(user_name(7, passwd), None);
        assert_eq!(user_name(7, "broken"), None);
    }

    #[test]
    fn each_userns_block_names_its_setting() {
        assert_eq!(userns_blocked(None, None, None), None);
        assert_eq!(userns_blocked(Some(15000), Some(1), Some(0)), None);
        let max = userns_blocked(Some(0), None, None).expect("blocked");
        assert!(max.contains("sysctl -w user.max_user_namespaces="), "{max}");
        let clone = userns_blocked(Some(15000), Some(0), None).expect("blocked");
        assert!(
            clone.contains("kernel.unprivileged_userns_clone=1"),
            "{clone}"
        );
        let aa = userns_blocked(None, None, Some(1)).expect("blocked");
        assert!(aa.contains("apparmor_restrict_unprivileged_userns"), "{aa}");
        assert!(aa.contains("AppArmor profile"), "{aa}");
    }
}
