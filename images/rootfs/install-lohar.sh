#!/usr/bin/env bash
# Put a lohar binary at /usr/local/bin/lohar inside an ext4 rootfs image,
# without mounting it (debugfs -w), then verify it by dumping it back.
#
#   images/rootfs/install-lohar.sh <rootfs.ext4> <static lohar binary>
#
# Idempotent: if the image already holds the same bytes (root:root, 0755) it
# returns at once. The image must not be in use by a running VM (debugfs writes
# the filesystem directly). Concurrent installs into the same image are
# serialised with flock. Progress goes to stderr; stdout prints the image path.
set -euo pipefail

die() { printf '[install-lohar] error: %s\n' "$*" >&2; exit 1; }
log() { printf '[install-lohar] %s\n' "$*" >&2; }

[[ $# -eq 2 ]] || die "usage: $0 <rootfs.ext4> <lohar-binary>"
IMAGE=$1
BIN=$2
DEST_DIR=/usr/local/bin
DEST=$DEST_DIR/lohar
[[ -f "$IMAGE" && -w "$IMAGE" ]] || die "$IMAGE: not a writable file"
[[ -f "$BIN" && -r "$BIN" ]] || die "$BIN: not a readable file"
command -v debugfs >/dev/null || die "debugfs missing (apt-get install e2fsprogs)"
# debugfs parses its command line on whitespace; keep the source path simple.
case "$BIN" in *[[:space:]\"\']*) die "binary path must not contain spaces or quotes: $BIN" ;; esac

TMP=$(mktemp -d /tmp/install-lohar.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

exec 9<"$IMAGE"
flock 9

want=$(sha256sum < "$BIN" | cut -c1-64)

# Prints "<mode> <uid> <gid> <sha256>" of $DEST in the image, or nothing.
current() {
  local st mode uid gid
  st=$(debugfs -R "stat $DEST" "$IMAGE" 2>/dev/null) || return 0
  [[ "$st" == *"Type: regular"* ]] || return 0
  mode=$(sed -n 's/.*Mode: *\([0-7]*\).*/\1/p' <<<"$st" | head -n1)
  uid=$(sed -n 's/^User: *\([0-9]*\) .*/\1/p' <<<"$st" | head -n1)
  gid=$(sed -n 's/.*Group: *\([0-9]*\).*/\1/p' <<<"$st" | head -n1)
  rm -f "$TMP/dump"
  debugfs -R "dump $DEST $TMP/dump" "$IMAGE" >/dev/null 2>&1 || return 0
  [[ -f "$TMP/dump" ]] || return 0
  printf '%s %s %s %s\n' "$mode" "$uid" "$gid" "$(sha256sum < "$TMP/dump" | cut -c1-64)"
}

if [[ "$(current)" == "0755 0 0 $want" ]]; then
  log "$IMAGE already has this lohar ($want)"
  printf '%s\n' "$IMAGE"
  exit 0
fi

# Only mkdir what is missing: debugfs 1.47.0's mkdir on an existing directory
# leaves a half-created directory inode behind (e2fsck then finds a block
# claimed twice). rm of a missing file is harmless. debugfs keeps going after
# a failed command, so the result is verified below rather than trusted.
exists() { debugfs -R "stat $1" "$IMAGE" 2>/dev/null | grep -q '^Inode:'; }
: > "$TMP/cmds"
for d in /usr /usr/local "$DEST_DIR"; do
  exists "$d" || printf 'mkdir %s\n' "$d" >> "$TMP/cmds"
done
exists "$DEST" && printf 'rm %s\n' "$DEST" >> "$TMP/cmds"
cat >> "$TMP/cmds" <<EOF
cd $DEST_DIR
write $BIN lohar
sif lohar mode 0100755
sif lohar uid 0
sif lohar gid 0
sif lohar mtime @$(date +%s)
sif lohar ctime @$(date +%s)
EOF
debugfs -w -f "$TMP/cmds" "$IMAGE" > "$TMP/log" 2>&1 || { cat "$TMP/log" >&2; die "debugfs failed"; }

got=$(current)
if [[ "$got" != "0755 0 0 $want" ]]; then
  cat "$TMP/log" >&2
  die "verification failed: expected '0755 0 0 $want', image has '${got:-nothing}'"
fi
# Cheap (tens of ms on a 2G image) and catches any debugfs surprise.
if ! e2fsck -fn "$IMAGE" > "$TMP/fsck" 2>&1; then
  cat "$TMP/log" "$TMP/fsck" >&2
  die "e2fsck reports errors in $IMAGE after the install"
fi
log "installed $BIN -> $IMAGE:$DEST (sha256 $want, 0755 root:root)"
printf '%s\n' "$IMAGE"
