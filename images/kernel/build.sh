#!/usr/bin/env bash
# Build the bhatti guest kernel: one uncompressed ELF `vmlinux` (PVH entry)
# that both Firecracker and QEMU `microvm` boot with everything built in.
#
# Usage:
#   images/kernel/build.sh                 # build (or reuse) and print the path
#   images/kernel/build.sh --config-only   # resolve + check the config only,
#                                          # print the resulting .config
#
# Environment:
#   BHATTI_CACHE    cache root (default /var/cache/bhatti-ci)
#   KERNEL_SOURCE   a Linux 6.1 source tarball (.tar.xz/.tar.gz/...) to use.
#                   Default: Debian's /usr/src/linux-source-6.1.tar.xz (package
#                   linux-source-6.1) when present, else a kernel.org tarball
#                   (KERNEL_VERSION, below) downloaded into
#                   $BHATTI_CACHE/kernel/src/.
#   KERNEL_VERSION  kernel.org version to download (default 6.1.192). Only
#                   used when neither of the above exists.
#   KERNEL_SHA256   expected sha256 of the downloaded tarball. If unset, it is
#                   checked against kernel.org's sha256sums.asc (fetched over
#                   HTTPS; its PGP signature is not verified).
#   JOBS            parallel make jobs (default: nproc)
#
# Output: $BHATTI_CACHE/kernel/<key>/{vmlinux,config,build-info.txt,build.log}
# where <key> = sha256(config.fragment + source identity + this script).
# The vmlinux path is the last line on stdout; everything else goes to stderr.
# A cache hit prints the path and exits at once. Safe to rerun and to run
# concurrently (a per-key lock; results are published by an atomic rename).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_PATH="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
FRAGMENT="$SCRIPT_DIR/config.fragment"
BHATTI_CACHE=${BHATTI_CACHE:-/var/cache/bhatti-ci}
KERNEL_VERSION=${KERNEL_VERSION:-6.1.192}
DEBIAN_SOURCE=/usr/src/linux-source-6.1.tar.xz
JOBS=${JOBS:-$(nproc)}
ARCH=x86_64
CACHE_DIR="$BHATTI_CACHE/kernel"

log() { printf '[kernel] %s\n' "$*" >&2; }
die() { printf '[kernel] ERROR: %s\n' "$*" >&2; exit 1; }

CONFIG_ONLY=0
case "${1:-}" in
  "") ;;
  --config-only) CONFIG_ONLY=1 ;;
  -h|--help) sed -n '2,28p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac

[ -f "$FRAGMENT" ] || die "missing $FRAGMENT"

check_tools() {
  local missing=() t
  for t in make gcc ld flex bison bc perl tar xz gzip sha256sum readelf flock; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} (apt-get install build-essential flex bison bc libelf-dev libssl-dev xz-utils)"
  # objtool (ORC unwinder) needs libelf headers.
  echo '#include <gelf.h>' | gcc -E -x c - >/dev/null 2>&1 \
    || die "libelf headers missing (apt-get install libelf-dev)"
}

# Resolve the source tarball. kernel.org download path: untested in CI (no
# internet there), kept simple and verified by sha256.
resolve_source() {
  if [ -n "${KERNEL_SOURCE:-}" ]; then
    [ -f "$KERNEL_SOURCE" ] || die "KERNEL_SOURCE=$KERNEL_SOURCE does not exist"
    SOURCE_TARBALL=$KERNEL_SOURCE
  elif [ -f "$DEBIAN_SOURCE" ]; then
    SOURCE_TARBALL=$DEBIAN_SOURCE
  else
    local name="linux-$KERNEL_VERSION.tar.xz"
    local url="https://cdn.kernel.org/pub/linux/kernel/v6.x/$name"
    local dir="$CACHE_DIR/src"
    SOURCE_TARBALL="$dir/$name"
    if [ ! -f "$SOURCE_TARBALL" ]; then
      command -v curl >/dev/null 2>&1 || die "curl needed to download $url"
      mkdir -p "$dir"
      local want=${KERNEL_SHA256:-}
      if [ -z "$want" ]; then
        want=$(curl -fsSL --retry 3 "https://cdn.kernel.org/pub/linux/kernel/v6.x/sha256sums.asc" \
                 | awk -v f="$name" '$2 == f { print $1 }')
        [ -n "$want" ] || die "no sha256 for $name in kernel.org sha256sums.asc"
      fi
      log "downloading $url"
      local tmp
      tmp=$(mktemp "$dir/.dl.XXXXXX")
      curl -fL --retry 3 -o "$tmp" "$url" || { rm -f "$tmp"; die "download failed: $url"; }
      local got
      got=$(sha256sum "$tmp" | cut -d' ' -f1)
      [ "$got" = "$want" ] || { rm -f "$tmp"; die "sha256 mismatch for $name: got $got want $want"; }
      mv -f "$tmp" "$SOURCE_TARBALL"
    fi
  fi
  SOURCE_SHA256=$(sha256sum "$SOURCE_TARBALL" | cut -d' ' -f1)
  # The "source version string" of the cache key: the tarball's name and
  # content hash (covers distro patch levels, not just the upstream version).
  SOURCE_ID="$(basename "$SOURCE_TARBALL") sha256=$SOURCE_SHA256"
}

cache_key() {
  { cat "$FRAGMENT"; printf '\n--source %s\n' "$SOURCE_ID"; cat "$SCRIPT_PATH"; } \
    | sha256sum | cut -d' ' -f1
}

# Every `CONFIG_X=value` line of the fragment must appear verbatim in .config
# and every `# CONFIG_X is not set` must not be on. merge_config.sh and
# olddefconfig silently drop options whose dependencies are not met.
verify_config() {
  local config=$1 bad=() line sym
  while IFS= read -r line; do
    grep -qxF -- "$line" "$config" || bad+=("  want $line, got: $(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo '<absent: unmet dependency or unknown symbol>')")
  done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$FRAGMENT")
  while IFS= read -r sym; do
    if grep -qE "^$sym=" "$config"; then
      bad+=("  want $sym off, got: $(grep -E "^$sym=" "$config")")
    fi
  done < <(sed -nE 's/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1/p' "$FRAGMENT")
  if [ ${#bad[@]} -gt 0 ]; then
    printf '[kernel] ERROR: %d option(s) of config.fragment did not take effect:\n' "${#bad[@]}" >&2
    printf '%s\n' "${bad[@]}" >&2
    return 1
  fi
  log "config check: all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$FRAGMENT") fragment options took effect"
}

# $1 = directory holding the extracted kernel tree
configure() {
  local src=$1
  make -C "$src" ARCH=$ARCH allnoconfig
  (cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$FRAGMENT")
  make -C "$src" ARCH=$ARCH olddefconfig
}

extract() {
  local dst=$1
  mkdir -p "$dst"
  log "extracting $SOURCE_TARBALL"
  tar -xf "$SOURCE_TARBALL" -C "$dst" --strip-components=1
  [ -f "$dst/Makefile" ] && [ -d "$dst/arch/x86" ] || die "$SOURCE_TARBALL does not look like a Linux source tree"
}

check_tools
mkdir -p "$CACHE_DIR"
resolve_source

if [ "$CONFIG_ONLY" = 1 ]; then
  WORK=$(mktemp -d "$CACHE_DIR/config-only.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  extract "$WORK/src"
  configure "$WORK/src" >&2
  verify_config "$WORK/src/.config"
  cat "$WORK/src/.config"
  exit 0
fi

KEY=$(cache_key)
OUT="$CACHE_DIR/$KEY"
if [ -f "$OUT/vmlinux" ]; then
  log "cache hit ($SOURCE_ID)"
  echo "$OUT/vmlinux"
  exit 0
fi

# One builder per key; others wait, then find the result in the cache.
exec 9>"$CACHE_DIR/.lock-$KEY"
if ! flock -n 9; then
  log "another build of $KEY is running; waiting for it"
  flock 9
fi
if [ -f "$OUT/vmlinux" ]; then
  log "cache hit after wait"
  echo "$OUT/vmlinux"
  exit 0
fi
# Leftovers of an interrupted build of this key (safe: we hold its lock).
rm -rf "$CACHE_DIR/build-$KEY".* "$CACHE_DIR/.stage-$KEY".*
# A result directory without vmlinux is not ours to trust (manual tampering).
[ ! -e "$OUT" ] || rm -rf "$OUT"

WORK=$(mktemp -d "$CACHE_DIR/build-$KEY.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG="$WORK/build.log"
: >"$LOG"
# Tee every step into build.log (kept next to the result) and stderr.
run() { "$@" 2>&1 | tee -a "$LOG" >&2; }

log "key $KEY"
log "source $SOURCE_ID"
log "building in $WORK with $JOBS jobs"
START=$(date +%s)

extract "$WORK/src"
KVER=$(make -s -C "$WORK/src" kernelversion)
log "kernel version $KVER"
run configure "$WORK/src"
verify_config "$WORK/src/.config" 2>&1 | tee -a "$LOG" >&2

export KBUILD_BUILD_USER=bhatti KBUILD_BUILD_HOST=bhatti
run make -C "$WORK/src" ARCH=$ARCH -j"$JOBS" vmlinux

VMLINUX="$WORK/src/vmlinux"
[ -f "$VMLINUX" ] || die "build finished but $VMLINUX is missing"
# The PVH entry is an ELF note owned by "Xen" (XEN_ELFNOTE_PHYS32_ENTRY);
# without it QEMU's -kernel cannot boot the ELF.
readelf -n "$VMLINUX" | grep -q 'Xen' || die "vmlinux has no PVH (Xen) ELF note"
END=$(date +%s)
ELAPSED=$((END - START))
log "build took ${ELAPSED}s ($((ELAPSED / 60))m$((ELAPSED % 60))s)"

STAGE=$(mktemp -d "$CACHE_DIR/.stage-$KEY.XXXXXX")
cp "$VMLINUX" "$STAGE/vmlinux"
cp "$WORK/src/.config" "$STAGE/config"
cp "$LOG" "$STAGE/build.log"
cat >"$STAGE/build-info.txt" <<EOF
key=$KEY
kernel_version=$KVER$(sed -nE 's/^CONFIG_LOCALVERSION="(.*)"$/\1/p' "$WORK/src/.config")
source=$SOURCE_TARBALL
source_sha256=$SOURCE_SHA256
compiler=$(gcc --version | head -n1)
jobs=$JOBS
build_seconds=$ELAPSED
built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
vmlinux_sha256=$(sha256sum "$STAGE/vmlinux" | cut -d' ' -f1)
EOF
chmod 0755 "$STAGE"
chmod 0644 "$STAGE"/*
sync -f "$STAGE/vmlinux" 2>/dev/null || true
mv -T "$STAGE" "$OUT"

rm -rf "$WORK"
trap - EXIT
log "done: $OUT"
echo "$OUT/vmlinux"
