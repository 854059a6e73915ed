# shellcheck shell=bash
# The end of each step that changes the tree (configure, a command,
# normalize): what it changed, its overlayfs upper directory, goes to the
# layers disk as an archive for kiln's cache and becomes a layer of its
# own, and the next step gets a new upper directory.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

unstack
layer_out "$KILN_LAYER_MARK"
# Archived: its copy on the scratch disk goes before the unpacked one comes.
rm -rf /build/upper /build/work
layer_in "$layer_off" "$layer_size"
stack_up
