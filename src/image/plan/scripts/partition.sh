# shellcheck shell=bash
# Step "partition": the target disk's table, from `gpt SGDISK-ARGS...`
# (sgdisk's options, all from kiln) or `mbr` (sfdisk reads the table kiln
# rendered in $P/sfdisk); then waits for the KILN_PARTITIONS nodes.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

T=$(disk "$KILN_TARGET_SERIAL")
table=$1
shift
case "$table" in
    gpt) sgdisk "$@" "$T" ;;
    mbr) sfdisk --quiet "$T" < "$P/sfdisk" ;;
    *) echo "partition.sh: unknown table '$table'" >&2; exit 2 ;;
esac
blockdev --rereadpt "$T" 2>/dev/null || true
for ((n = 1; n <= KILN_PARTITIONS; n++)); do
    part "$n" >/dev/null
done
