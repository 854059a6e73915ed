//! Builds the guest agent as a static binary (musl) so `kiln` can embed it in
//! the initramfs it writes. A separate target directory keeps this nested
//! cargo off the outer build's lock.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";

fn main() {
    println!("cargo:rerun-if-changed=guest-agent/src");
    println!("cargo:rerun-if-changed=guest-agent/Cargo.toml");
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-env-changed=KILN_AGENT_BIN");

    // A prebuilt agent can be supplied (packagers, cross builds).
    if let Ok(prebuilt) = env::var("KILN_AGENT_BIN") {
        println!("cargo:rustc-env=KILN_AGENT_PATH={prebuilt}");
        return;
    }

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out.join("agent-target");

    let status = Command::new(&cargo)
        .current_dir(&manifest)
        .args([
            "build",
            "--release",
            "-p",
            "kiln-agent",
            "--bin",
            "kiln-agent",
        ])
        .args(["--target", AGENT_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        // Settings meant for the outer build must not leak into this one.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_MAKEFLAGS")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "building the guest agent for {AGENT_TARGET} failed ({s}); see the compiler \
             output above (if the target is missing: rustup target add {AGENT_TARGET})"
        ),
        Err(e) => panic!("running {cargo} to build the guest agent: {e}"),
    }
    let bin = target_dir
        .join(AGENT_TARGET)
        .join("release")
        .join("kiln-agent");
    println!("cargo:rustc-env=KILN_AGENT_PATH={}", bin.display());
}
