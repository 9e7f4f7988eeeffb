#!/usr/bin/env bash
# Builds or reuses everything a VM needs and prints shell `export` lines:
#   BHATTI_KERNEL  the guest vmlinux (images/kernel/build.sh, cached)
#   BHATTI_LOHAR   the static agent (scripts/build-lohar.sh)
#   BHATTI_ROOTFS  the minimal rootfs with that lohar installed (cached base
#                  + a copy with lohar swapped in, redone only when lohar changes)
# Usage: eval "$(scripts/artifacts.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."
export BHATTI_CACHE=${BHATTI_CACHE:-/var/cache/bhatti-ci}

kernel=$(images/kernel/build.sh | tail -n 1)
lohar=$(scripts/build-lohar.sh | tail -n 1)
rootfs=$(LOHAR="$lohar" images/rootfs/build.sh | tail -n 1)
for f in "$kernel" "$lohar" "$rootfs"; do
  [ -s "$f" ] || { echo "artifacts: missing $f" >&2; exit 1; }
done
printf 'export BHATTI_KERNEL=%q\nexport BHATTI_LOHAR=%q\nexport BHATTI_ROOTFS=%q\n' \
  "$(realpath "$kernel")" "$(realpath "$lohar")" "$(realpath "$rootfs")"
