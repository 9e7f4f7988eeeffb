#!/usr/bin/env bash
# Builds lohar, the guest agent, as a static binary (static glibc: no shared
# libraries in the guest are needed, so it runs as PID 1 on any rootfs).
#
#   scripts/build-lohar.sh            # prints the binary's path on stdout
#
# Static glibc has no NSS: lohar must never resolve user or host names
# (getpwnam, getaddrinfo of names); it uses numeric ids and SocketAddr only.
# Progress and the size report go to stderr.
set -euo pipefail

cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
PROFILE=lohar

RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --profile "$PROFILE" -p lohar --target "$TARGET" >&2

BIN="${CARGO_TARGET_DIR:-target}/$TARGET/$PROFILE/lohar"
[[ -x "$BIN" ]] || { echo "build-lohar: $BIN was not built" >&2; exit 1; }

desc=$(file -b "$BIN")
case "$desc" in
  *"statically linked"* | *"static-pie linked"*) ;;
  *) echo "build-lohar: $BIN is not static: $desc" >&2; exit 1 ;;
esac
size=$(stat -c %s "$BIN")
echo "build-lohar: $BIN: $size bytes; $desc" >&2
echo "$BIN"
