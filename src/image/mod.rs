//! Disk images: recipes, `kiln build` (the root filesystem on the host,
//! the privileged steps in a sandbox VM, the output formats) and
//! `kiln boot` (a built image booted through firmware). Uses `sandbox`
//! and `util`.

mod apt_cache;
pub mod build;
mod ext4;
pub mod firmware_boot;
mod ids;
mod layers;
mod lock;
mod output;
mod plan;
pub mod recipe;
mod rootfs;
