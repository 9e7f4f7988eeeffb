#!/usr/bin/env bash
# Installs bhatti on a fresh Debian/Ubuntu machine with KVM, as root:
#
#   sudo ./scripts/install.sh
#
# 1. packages (scripts/install-deps.sh);
# 2. builds bhatti (cargo, release) and lohar, the guest agent;
# 3. builds or reuses the guest kernel and rootfs (scripts/artifacts.sh,
#    cached under $BHATTI_CACHE, default /var/cache/bhatti-ci);
# 4. installs bhatti and lohar into /usr/local/bin and the images into
#    /var/lib/bhatti/images (BHATTI_TIERS=minimal,dev adds the dev tier's
#    rootfs-dev.ext4); writes /etc/bhatti/config.toml if missing;
# 5. starts the daemon: a systemd unit when systemd runs the machine, else a
#    background process (pid file /run/bhatti/bhatti.pid, log
#    /var/log/bhatti.log);
# 6. creates an admin user (if none), configures the CLI for root and for
#    the user who ran sudo;
# 7. creates a first sandbox and runs a command in it.
#
# Rerunning upgrades the binaries and images and reuses the rest (config,
# user, key, sandbox).
#
# Firecracker: used when its binary is found (BHATTI_FIRECRACKER=/path, or
# `firecracker` in PATH) and KVM works; otherwise QEMU (installed here). On a
# real KVM host you can download the official static release
# (github.com/firecracker-microvm/firecracker/releases, x86_64 tarball),
# then: sudo BHATTI_FIRECRACKER=/path/to/firecracker ./scripts/install.sh
# Nothing here downloads it: the install works without internet access once
# the packages and crates are available.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

say() { printf '\033[1minstall:\033[0m %s\n' "$*" >&2; }
die() { printf 'install: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: sudo ./scripts/install.sh"
[ -e /dev/kvm ] || say "warning: /dev/kvm is missing; VMs will run under QEMU TCG (slow)"

PREFIX=${PREFIX:-/usr/local}
DATA_DIR=/var/lib/bhatti
CONF_DIR=/etc/bhatti
CONFIG=$CONF_DIR/config.toml
SOCKET=/run/bhatti/bhatti.sock
ADMIN_USER=${BHATTI_ADMIN_USER:-admin}
FIRST_SANDBOX=${BHATTI_FIRST_SANDBOX:-first}
BIN=$PREFIX/bin/bhatti
# The CLI as root, with root's own CLI config whatever sudo kept.
root_cli() { env -u XDG_CONFIG_HOME -u BHATTI_URL -u BHATTI_TOKEN HOME=/root "$BIN" "$@"; }

# The invoking user (sudo), for cargo and for their CLI config.
INVOKER=${SUDO_USER:-}
[ "$INVOKER" = root ] && INVOKER=
INVOKER_HOME=
if [ -n "$INVOKER" ]; then
  INVOKER_HOME=$(getent passwd "$INVOKER" | cut -d: -f6)
fi

# cargo: root's, else the sudo user's rustup install.
if ! command -v cargo >/dev/null && [ -n "$INVOKER_HOME" ] && [ -x "$INVOKER_HOME/.cargo/bin/cargo" ]; then
  export PATH="$INVOKER_HOME/.cargo/bin:$PATH"
  [ -d /root/.rustup ] || export RUSTUP_HOME="$INVOKER_HOME/.rustup"
  say "using $INVOKER's Rust toolchain ($INVOKER_HOME/.cargo/bin)"
fi

say "1/7 packages"
scripts/install-deps.sh

say "2/7 building bhatti (release)"
cargo build --release --locked -p bhatti >&2

say "3/7 kernel, lohar and rootfs (built once, then cached)"
eval "$(scripts/artifacts.sh)"

say "4/7 installing into $PREFIX/bin and $DATA_DIR/images"
install -d -m 0755 "$PREFIX/bin"
install -m 0755 "${CARGO_TARGET_DIR:-target}/release/bhatti" "$BIN"
install -m 0755 "$BHATTI_LOHAR" "$PREFIX/bin/lohar"
if [ -n "${BHATTI_FIRECRACKER:-}" ]; then
  [ -x "$BHATTI_FIRECRACKER" ] || die "BHATTI_FIRECRACKER=$BHATTI_FIRECRACKER is not an executable"
  install -m 0755 "$BHATTI_FIRECRACKER" "$PREFIX/bin/firecracker"
  say "installed Firecracker from $BHATTI_FIRECRACKER"
  # Its jailer (same release, same dir): Firecracker runs under it by
  # default ([vm] firecracker_jailer).
  JAILER=${BHATTI_JAILER:-$(dirname "$BHATTI_FIRECRACKER")/jailer}
  if [ -x "$JAILER" ]; then
    install -m 0755 "$JAILER" "$PREFIX/bin/jailer"
    say "installed the jailer from $JAILER"
  else
    say "no jailer next to $BHATTI_FIRECRACKER: set [vm] firecracker_jailer = false, or install the release's jailer"
  fi
elif command -v firecracker >/dev/null; then
  say "Firecracker found at $(command -v firecracker)"
else
  say "no Firecracker binary: sandboxes run on QEMU (see the top of this script for Firecracker)"
fi
install -d -m 0700 "$DATA_DIR"
install -d -m 0755 "$DATA_DIR/images"
# Replace an image only when it changed, atomically (sandboxes' disks are
# clones, so a running sandbox does not notice).
put_image() {
  local src=$1 dst=$2
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    return
  fi
  cp --sparse=always "$src" "$dst.new"
  mv -f "$dst.new" "$dst"
  say "  $dst updated"
}
put_image "$BHATTI_KERNEL" "$DATA_DIR/images/vmlinux"
put_image "$BHATTI_ROOTFS" "$DATA_DIR/images/rootfs.ext4"
# More rootfs tiers when asked (BHATTI_TIERS=minimal,dev): the dev tier has
# git, python3 with pip and venv, nodejs and npm, build tools, jq, ripgrep.
# It is installed beside the default as rootfs-<tier>.ext4 and shared as
# the image `dev` (below); point [vm] rootfs at it to make it every
# sandbox's root.
for tier in $(printf '%s' "${BHATTI_TIERS:-minimal}" | tr ',' ' '); do
  case "$tier" in
    minimal) ;;
    dev)
      say "  building the $tier tier (cached after the first time)"
      tier_image=$(LOHAR="$BHATTI_LOHAR" images/rootfs/build.sh --tier "$tier" | tail -n 1)
      put_image "$tier_image" "$DATA_DIR/images/rootfs-$tier.ext4"
      ;;
    *) die "unknown tier '$tier' in BHATTI_TIERS (minimal, dev)" ;;
  esac
done
install -d -m 0755 "$CONF_DIR"
if [ ! -f "$CONFIG" ]; then
  # Every key at its default: data in /var/lib/bhatti, images under
  # images/, the socket at /run/bhatti/bhatti.sock, TCP on 127.0.0.1:8080.
  "$BIN" admin example-config > "$CONFIG.new"
  chmod 0644 "$CONFIG.new"
  mv "$CONFIG.new" "$CONFIG"
  say "  wrote $CONFIG"
else
  say "  keeping $CONFIG"
fi
# The dev tier is a shared image (`bhatti create --image dev`): listed under
# [images.shared] unless the config has that table already.
case ",${BHATTI_TIERS:-minimal}," in
  *,dev,*)
    if ! grep -q '^\[images\.shared\]' "$CONFIG"; then
      printf '\n[images.shared]\ndev = "%s"\n' "$DATA_DIR/images/rootfs-dev.ext4" >> "$CONFIG"
      say "  registered the dev tier as the shared image 'dev' in $CONFIG"
    fi
    ;;
esac

say "5/7 starting the daemon"
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && command -v systemctl >/dev/null; then
  cat > /etc/systemd/system/bhatti.service.new <<EOF
[Unit]
Description=bhatti sandbox daemon
Documentation=file://$REPO/README.md
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$BIN serve --config $CONFIG
# VMs outlive the daemon and are re-adopted when it starts again: stopping
# or restarting the service ends only the daemon itself.
KillMode=process
Restart=on-failure
RestartSec=2
RuntimeDirectory=bhatti
RuntimeDirectoryPreserve=yes
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
EOF
  mv /etc/systemd/system/bhatti.service.new /etc/systemd/system/bhatti.service
  systemctl daemon-reload
  systemctl enable bhatti.service >/dev/null 2>&1 || true
  systemctl restart bhatti.service
  MODE="systemd unit bhatti.service (journalctl -u bhatti)"
else
  PIDFILE=/run/bhatti/bhatti.pid
  LOG=/var/log/bhatti.log
  install -d -m 0755 /run/bhatti
  if [ -f "$PIDFILE" ]; then
    old=$(cat "$PIDFILE")
    if [ -n "$old" ] && grep -q "bhatti" "/proc/$old/cmdline" 2>/dev/null; then
      say "  stopping the running daemon (pid $old) to upgrade it"
      kill -TERM "$old" 2>/dev/null || true
      for _ in $(seq 1 300); do
        kill -0 "$old" 2>/dev/null || break
        sleep 0.1
      done
      kill -KILL "$old" 2>/dev/null || true
    fi
  fi
  setsid nohup "$BIN" serve --config "$CONFIG" >>"$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  MODE="background process, pid $(cat "$PIDFILE"), log $LOG"
fi
# Wait for /health (the daemon recovers existing sandboxes first).
ready=
for _ in $(seq 1 240); do
  if "$BIN" admin status --config "$CONFIG" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.5
done
[ -n "$ready" ] || {
  "$BIN" admin status --config "$CONFIG" >&2 || true
  die "the daemon did not come up within 120 s ($MODE)"
}
say "  daemon up: $MODE"

say "6/7 admin user and CLI configuration"
ROOT_CLI=/root/.config/bhatti/config.toml
KEY=
# Reuse root's saved key if it still works.
if [ -f "$ROOT_CLI" ] && root_cli list >/dev/null 2>&1; then
  KEY=$(sed -n 's/^token = "\(.*\)"$/\1/p' "$ROOT_CLI")
  say "  reusing the key saved in $ROOT_CLI"
fi
if [ -z "$KEY" ]; then
  if "$BIN" user list --json --config "$CONFIG" | grep -q "\"name\": \"$ADMIN_USER\""; then
    say "  user '$ADMIN_USER' exists but no working key is saved: issuing a new key"
    KEY=$("$BIN" user rotate-key "$ADMIN_USER" --config "$CONFIG" 2>/dev/null)
  else
    KEY=$("$BIN" user create --name "$ADMIN_USER" --config "$CONFIG" 2>/dev/null)
    say "  created user '$ADMIN_USER'"
  fi
fi
[ -n "$KEY" ] || die "no API key for '$ADMIN_USER'"
env -u XDG_CONFIG_HOME HOME=/root BHATTI_TOKEN="$KEY" "$BIN" setup --url "unix://$SOCKET" >&2
if [ -n "$INVOKER" ]; then
  # The socket when that user may use it, else the loopback TCP listener.
  url="unix://$SOCKET"
  if ! sudo -u "$INVOKER" test -w "$SOCKET"; then
    tcp=$(sed -n 's/^listen_tcp = "\(.*\)"$/\1/p' "$CONFIG" | head -n 1)
    [ -n "$tcp" ] && url="http://$tcp"
  fi
  sudo -u "$INVOKER" -H env BHATTI_TOKEN="$KEY" "$BIN" setup --url "$url" >&2 \
    || say "  warning: could not configure the CLI for $INVOKER (run: bhatti setup)"
fi

say "7/7 a first sandbox"
root_cli create "$FIRST_SANDBOX" >&2
say "  bhatti exec $FIRST_SANDBOX -- uname -a"
root_cli exec "$FIRST_SANDBOX" -- uname -a

cat >&2 <<EOF

bhatti is installed.
  daemon:   $MODE
  config:   $CONFIG   (data in $DATA_DIR)
  CLI:      $BIN, configured for root${INVOKER:+ and $INVOKER}
  user:     $ADMIN_USER (key saved by \`bhatti setup\` in ~/.config/bhatti/config.toml)
  sandbox:  $FIRST_SANDBOX

Try:
  bhatti list
  bhatti exec $FIRST_SANDBOX -- sh -c 'echo hello from \$(hostname)'
  bhatti shell $FIRST_SANDBOX        (Ctrl+\\ detaches)
  bhatti destroy $FIRST_SANDBOX
EOF
