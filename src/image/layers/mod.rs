//! The build tree's layers: each step that changes the tree (configure,
//! each command, normalize) runs on overlayfs in the build VM, and what it
//! changed, its upper directory, is archived as a layer and cached under a
//! key naming everything it was made from (`keys`, `store`). A rebuild runs
//! from the first step whose key changed. The host merges the root archive
//! and the layers into the image's ext4 root (`merge`), so the VM never
//! archives the whole tree.

pub mod base;
pub mod keys;
pub mod merge;
pub mod store;
