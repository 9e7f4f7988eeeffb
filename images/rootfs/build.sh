#!/usr/bin/env bash
# Build the bhatti guest root filesystem as a sparse ext4 image, in one of
# two tiers: `minimal` (the default) or `dev` (minimal + git, python3 with pip
# and venv, nodejs and npm, build tools, jq, ripgrep).
#
#   base=$(images/rootfs/build.sh)                      # cached, lohar-agnostic
#   dev=$(images/rootfs/build.sh --tier dev)            # the dev tier
#   images/rootfs/install-lohar.sh "$base" path/to/lohar  # swap the agent in
#
# or, keeping the cached base pristine:
#
#   img=$(LOHAR=path/to/lohar images/rootfs/build.sh)   # base + lohar, derived copy
#
# Environment:
#   BHATTI_CACHE    cache root (default /var/cache/bhatti-ci)
#   LOHAR           optional static lohar binary; if set, the last stdout line
#                   is a derived image <key>/rootfs+lohar-<lohar hash>.ext4 (see README.md)
#   ROOTFS_SIZE     apparent size of the sparse image (default 2G; dev: 4G)
#   ROOTFS_TIER     "minimal" (default) or "dev"; `--tier NAME` sets it too
#   DEBIAN_MIRROR   override the mirror (default: taken from the host's apt sources)
#   DEBIAN_SECURITY_MIRROR  likewise for bookworm-security
#   MMDEBSTRAP_MODE mmdebstrap --mode (default root; "unshare" also works when
#                   user namespaces are available)
#
# Only the image path goes to stdout (as the last line); progress goes to stderr.
# Needs root (mmdebstrap --mode=root, chroot, file ownership for mkfs.ext4 -d).
# Never loop-mounts anything.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BHATTI_CACHE=${BHATTI_CACHE:-/var/cache/bhatti-ci}
ROOTFS_TIER=${ROOTFS_TIER:-minimal}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tier) [[ $# -ge 2 ]] || { echo "[rootfs] error: --tier needs a value" >&2; exit 2; }
            ROOTFS_TIER=$2; shift 2 ;;
    --tier=*) ROOTFS_TIER=${1#--tier=}; shift ;;
    *) echo "[rootfs] error: unknown argument '$1' (usage: build.sh [--tier minimal|dev])" >&2; exit 2 ;;
  esac
done
MMDEBSTRAP_MODE=${MMDEBSTRAP_MODE:-root}
SUITE=bookworm
LABEL=bhatti-root

log() { printf '[rootfs] %s\n' "$*" >&2; }
die() { printf '[rootfs] error: %s\n' "$*" >&2; exit 1; }

case "$ROOTFS_TIER" in
  minimal) ROOTFS_SIZE=${ROOTFS_SIZE:-2G} ;;
  dev) ROOTFS_SIZE=${ROOTFS_SIZE:-4G} ;;
  *) die "unknown tier '$ROOTFS_TIER' (minimal or dev)" ;;
esac

# --- package list (part of the cache key) ----------------------------------
# On top of the minbase variant (Essential + Priority: required).
PACKAGES=(
  # the brief
  bash coreutils ca-certificates curl git python3 sudo procps iproute2 less
  tmux fuse3
  # a sane interactive shell and network basics
  ncurses-base ncurses-term nano vim-tiny bash-completion
  iputils-ping netbase openssh-client tzdata
  # everyday archive tools
  xz-utils unzip
)
if [[ "$ROOTFS_TIER" == dev ]]; then
  # "Node, git and common tools pre-installed": the newest the distribution
  # has (bookworm: Node.js 18, npm 9, Python 3.11).
  PACKAGES+=(
    python3-pip python3-venv python3-dev
    nodejs npm
    build-essential pkg-config make
    jq ripgrep
    openssh-client rsync
  )
fi

# --- cache key ----------------------------------------------------------------
# sha256 over this script's bytes and the package list. lohar is deliberately
# not part of it: it is swapped in afterwards by install-lohar.sh.
KEY=$( { cat "${BASH_SOURCE[0]}"; printf '%s\n' "$ROOTFS_TIER" "${PACKAGES[@]}"; } \
       | sha256sum | cut -c1-64)
# Tiers other than minimal live apart, so what finds "the newest minimal
# rootfs" (tests, benchmarks) never picks one of them.
if [[ "$ROOTFS_TIER" == minimal ]]; then CACHE_DIR="$BHATTI_CACHE/rootfs"; else CACHE_DIR="$BHATTI_CACHE/rootfs-$ROOTFS_TIER"; fi
OUT_DIR="$CACHE_DIR/$KEY"
IMAGE="$OUT_DIR/rootfs.ext4"

# Optional: derive base + lohar, keeping the base untouched. The derived
# image is named by lohar's hash, so checkouts with different agents never
# replace each other's; `rootfs+lohar.ext4` links to the newest, and only
# the three most recently used are kept.
emit() {
  if [[ -z "${LOHAR:-}" ]]; then
    printf '%s\n' "$IMAGE"
    return
  fi
  [[ -f "$LOHAR" ]] || die "LOHAR=$LOHAR is not a file"
  local want derived tmp old
  want=$(sha256sum "$LOHAR" | cut -c1-16)
  derived="$OUT_DIR/rootfs+lohar-$want.ext4"
  if [[ -f "$derived" ]]; then
    log "derived image up to date (lohar $want)"
    touch "$derived"
  else
    tmp=$(mktemp "$OUT_DIR/.rootfs+lohar.XXXXXX")
    chmod 0644 "$tmp"
    cp --sparse=always --reflink=auto "$IMAGE" "$tmp"
    "$SCRIPT_DIR/install-lohar.sh" "$tmp" "$LOHAR" >&2 || { rm -f "$tmp"; die "install-lohar failed"; }
    mv -f "$tmp" "$derived"
  fi
  ln -sfn "$(basename "$derived")" "$OUT_DIR/.rootfs+lohar.link"
  mv -Tf "$OUT_DIR/.rootfs+lohar.link" "$OUT_DIR/rootfs+lohar.ext4"
  rm -f "$OUT_DIR/rootfs+lohar.ext4.lohar-sha256"
  # shellcheck disable=SC2012
  ls -1t "$OUT_DIR"/rootfs+lohar-*.ext4 2>/dev/null | tail -n +9 | while read -r old; do
    rm -f "$old"
  done
  printf '%s\n' "$derived"
}

if [[ -f "$IMAGE" ]]; then
  log "cache hit: $IMAGE"
  emit
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap --mode=root, chroot, mkfs.ext4 -d ownership)"
for tool in mmdebstrap mkfs.ext4 debugfs sha256sum; do
  command -v "$tool" >/dev/null || die "missing $tool (apt-get install mmdebstrap e2fsprogs)"
done

# --- mirrors: reuse what the host's apt uses, so the build works wherever apt does
# Prints the first URI of a deb822 stanza or one-line entry whose suites
# contain exactly $1.
host_mirror() {
  local suite=$1 f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    awk -v want="$suite" '
      function flush() { if (uris != "" && hit && !skip) { split(uris, u, " "); print u[1]; found=1; exit } uris=""; hit=0; skip=0 }
      /^[[:space:]]*$/ { flush(); next }
      /^URIs:/   { sub(/^URIs:[[:space:]]*/, ""); uris=$0 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) hit=1 }
      /^Types:/  { if ($0 !~ /(^|[[:space:]])deb([[:space:]]|$)/) skip=1; else skip=0 }
      END { if (!found && uris != "" && hit && !skip) { split(uris, u, " "); print u[1] } }
    ' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    awk -v want="$suite" '
      $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                    if ($(i+1) == want) print $i }' "$f"
  done
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror "$SUITE" | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SEC_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(host_mirror "$SUITE-security" | head -n1)}
SEC_MIRROR=${SEC_MIRROR:-http://deb.debian.org/debian-security}
MIRROR=${MIRROR%/}; SEC_MIRROR=${SEC_MIRROR%/}

# --- build in a temp dir under the cache, rename atomically at the end ---------
mkdir -p "$CACHE_DIR"
WORK=$(mktemp -d "$CACHE_DIR/.tmp-$KEY.XXXXXX")
chmod 0755 "$WORK"   # lets apt's _apt user download into the tree (sandboxed)
cleanup() {
  # mmdebstrap --mode=root unmounts what it mounted; never follow mounts anyway.
  [[ -n "${WORK:-}" && -d "$WORK" ]] && rm -rf --one-file-system "$WORK"
  return 0
}
trap cleanup EXIT
ROOT="$WORK/root"
mkdir -m 0755 "$ROOT"

START=$(date +%s)
log "key $KEY"
log "mmdebstrap $SUITE (minbase, mode=$MMDEBSTRAP_MODE) from $MIRROR"

INCLUDE=$(IFS=,; printf '%s' "${PACKAGES[*]}")
mmdebstrap \
  --mode="$MMDEBSTRAP_MODE" \
  --variant=minbase \
  --format=directory \
  --include="$INCLUDE" \
  --aptopt='APT::Install-Recommends "false"' \
  --aptopt='APT::Install-Suggests "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --dpkgopt='path-exclude=/usr/share/linda/*' \
  "$SUITE" "$ROOT" \
  "deb $MIRROR $SUITE main" \
  "deb $MIRROR $SUITE-updates main" \
  "deb $SEC_MIRROR $SUITE-security main" \
  >&2

log "mmdebstrap done in $(( $(date +%s) - START ))s; configuring"

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

# The no-recommends setting was only for the build; apt inside the guest behaves
# like stock Debian. The dpkg doc/man excludes stay (keeps the disk small).
rm -f "$ROOT/etc/apt/apt.conf.d/99mmdebstrap"

# --- user lohar (uid/gid 1000), passwordless sudo, /workspace -------------------
in_root groupadd --gid 1000 lohar
in_root useradd --uid 1000 --gid 1000 --create-home --home-dir /home/lohar \
  --shell /bin/bash --comment 'bhatti sandbox user' lohar
install -d -m 0755 -o 1000 -g 1000 "$ROOT/workspace"
install -d -m 0750 "$ROOT/etc/sudoers.d"
printf 'lohar ALL=(ALL:ALL) NOPASSWD:ALL\n' > "$ROOT/etc/sudoers.d/lohar"
chown 0:0 "$ROOT/etc/sudoers.d/lohar"
chmod 0440 "$ROOT/etc/sudoers.d/lohar"
in_root visudo -cq -f /etc/sudoers.d/lohar || die "sudoers.d/lohar does not parse"

# --- identity files (lohar rewrites hostname/hosts/resolv.conf at boot) --------
printf 'bhatti\n' > "$ROOT/etc/hostname"
cat > "$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	bhatti
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
rm -f "$ROOT/etc/resolv.conf"
printf '# written by lohar at boot from the sandbox config\nnameserver 1.1.1.1\n' > "$ROOT/etc/resolv.conf"
: > "$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
printf '# filesystems are mounted by lohar (PID 1)\n' > "$ROOT/etc/fstab"
printf 'LANG=C.UTF-8\n' > "$ROOT/etc/default/locale"
ln -sf /usr/share/zoneinfo/Etc/UTC "$ROOT/etc/localtime"
printf 'Etc/UTC\n' > "$ROOT/etc/timezone"

# --- lohar placeholder: PID 1 is /usr/local/bin/lohar (init=/usr/local/bin/lohar)
install -d -m 0755 "$ROOT/usr/local/bin"
cat > "$ROOT/usr/local/bin/lohar" <<'EOF'
#!/bin/sh
# Placeholder baked by images/rootfs/build.sh. Replace it without rebuilding:
#   images/rootfs/install-lohar.sh <rootfs.ext4> <static lohar binary>
echo "bhatti: /usr/local/bin/lohar is a placeholder; install the agent with images/rootfs/install-lohar.sh" >&2
exit 1
EOF
chmod 0755 "$ROOT/usr/local/bin/lohar"

# --- shrink: caches, logs, docs ------------------------------------------------
in_root apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin \
       "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old \
       "$ROOT"/var/log/apt/* "$ROOT"/var/cache/ldconfig/aux-cache \
       "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* \
       "$ROOT"/tmp/* "$ROOT"/var/tmp/* "$ROOT"/root/.bash_history
find "$ROOT/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
find "$ROOT/var/log" -type f -exec truncate -s 0 {} +
find "$ROOT/usr/lib/python3" -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
mountpoint -q "$ROOT/proc" && die "$ROOT/proc is still mounted"

# --- ext4 image, populated from the tree (no loop mount) ----------------------
TREE_KB=$(du -sk --apparent-size "$ROOT" | cut -f1)
log "tree is $(( TREE_KB / 1024 )) MiB; making ${ROOTFS_SIZE} ext4"
truncate -s "$ROOTFS_SIZE" "$WORK/rootfs.ext4"
# Deterministic fs UUID from the key; itable/journal zeroed now so the guest
# kernel's lazyinit thread never writes the whole inode table at first boot.
UUID=$(printf '%s' "$KEY" | sed -E 's/^(.{8})(.{4}).(.{3}).(.{3})(.{12}).*/\1-\2-4\3-8\4-\5/')
mkfs.ext4 -q -F -L "$LABEL" -U "$UUID" -m 0 \
  -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 \
  -d "$ROOT" "$WORK/rootfs.ext4" >&2
e2fsck -fn "$WORK/rootfs.ext4" >/dev/null 2>&1 || die "fresh image fails e2fsck"
# mke2fs zeroes the inode tables and journal of a file with fallocate, which
# leaves them as allocated unwritten extents (~60 MB of disk). A sparse copy
# turns them into holes (they still read as zeros; fallocate --dig-holes skips
# unwritten extents, so it is no help here).
cp --sparse=always "$WORK/rootfs.ext4" "$WORK/rootfs.ext4.sparse"
mv -f "$WORK/rootfs.ext4.sparse" "$WORK/rootfs.ext4"
rm -rf --one-file-system "$ROOT"

printf '%s\n' "$KEY" > "$WORK/key"
printf 'tier=%s\nsuite=%s\nmirror=%s\nbuilt=%s\nbuild_seconds=%s\npackages=%s\n' \
  "$ROOTFS_TIER" "$SUITE" "$MIRROR" "$(date -u +%FT%TZ)" "$(( $(date +%s) - START ))" \
  "${PACKAGES[*]}" > "$WORK/build-info"

# Atomic publish. If a concurrent build won the race, keep theirs.
if mv -T "$WORK" "$OUT_DIR" 2>/dev/null; then
  WORK=
else
  [[ -f "$IMAGE" ]] || die "could not publish $OUT_DIR"
  log "another build published $OUT_DIR first; using it"
fi
log "built $IMAGE in $(( $(date +%s) - START ))s ($(du -h "$IMAGE" | cut -f1) on disk, ${ROOTFS_SIZE} apparent)"
emit
