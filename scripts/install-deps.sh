#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages bhatti needs to build its guest kernel
# and rootfs, run VMs and run its tests. Idempotent; run as root.
set -euo pipefail

PACKAGES=(
  # VMM (QEMU microvm; Firecracker is found separately, see README)
  qemu-system-x86
  # guest kernel build (Linux 6.1 from Debian's linux-source-6.1 where it exists)
  build-essential flex bison bc libelf-dev libssl-dev cpio dwarves
  # rootfs build and disk images
  mmdebstrap e2fsprogs xfsprogs file
  # OCI image tests (crates/engine/tests/oci_pull.rs): a local registry,
  # images built and pushed without Docker, htpasswd for the auth registry
  docker-registry umoci skopeo apache2-utils
  # the image API test's guest userland (crates/bhatti/tests/images.rs)
  busybox-static
  # networking (bridges, TAPs, namespaces, NAT)
  iproute2 nftables conntrack
  # the Firecracker test guest is assembled at test time
  binutils
  ca-certificates curl
  # the web shell's browser test (crates/bhatti/tests/webshell.rs)
  chromium chromium-driver
  # the backup tests' S3 server (moto, from PyPI below) and backup-bench's
  # zstd -3 floor
  python3 python3-pip zstd
)

if ! command -v apt-get >/dev/null; then
  echo "install-deps: only Debian and Ubuntu (apt-get) are supported" >&2
  exit 1
fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
# The web shell's xterm.js comes from the npm registry at build time
# (crates/bhatti/build.rs runs `npm ci`). Any Node.js with npm will do (a
# NodeSource nodejs bundles npm and conflicts with Debian's npm package).
if ! command -v npm >/dev/null; then
  echo "install-deps: installing nodejs npm" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
fi
# The backup tests' S3 server (bhatti_testkit::s3): moto from PyPI, which
# Debian does not package; pip refuses the system Python without
# --break-system-packages (PEP 668), and it installs under /usr/local.
if ! python3 -c 'import moto.server, boto3' 2>/dev/null; then
  echo "install-deps: installing moto[server] from PyPI" >&2
  python3 -m pip install -q --break-system-packages 'moto[server]>=5.1,<6' >&2
fi
# The API fuzz test (crates/bhatti/tests/api_fuzz.rs): schemathesis from
# PyPI, with the same python3, which the test runs it with.
if ! python3 -c 'import schemathesis.cli' 2>/dev/null; then
  echo "install-deps: installing schemathesis from PyPI" >&2
  python3 -m pip install -q --break-system-packages 'schemathesis>=4.3,<5' >&2
fi
# The E2B SDK suite (crates/bhatti/tests/e2b.rs): the official SDK from
# PyPI (major version pinned: 3.x may drop E2B_API_URL/E2B_SANDBOX_URL),
# pytest and pytest-asyncio, with the same python3 the test runs.
if ! python3 -c 'import e2b, pytest, pytest_asyncio' 2>/dev/null; then
  echo "install-deps: installing e2b, pytest, pytest-asyncio from PyPI" >&2
  python3 -m pip install -q --break-system-packages 'e2b>=2,<3' 'pytest>=8' 'pytest-asyncio>=0.24' >&2
fi
# Debian's kernel source package; elsewhere the kernel build downloads 6.1
# from kernel.org.
if ! dpkg-query -W -f='${Status}' linux-source-6.1 2>/dev/null | grep -q "install ok installed"; then
  if apt-cache show linux-source-6.1 >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-source-6.1 >&2
  else
    echo "install-deps: linux-source-6.1 is not packaged here; the kernel build downloads it from kernel.org" >&2
  fi
fi
# The unprivileged system user a confined QEMU switches to once it has
# opened its devices (crates/vmm/src/qemu/confine.rs).
getent passwd bhatti-vmm >/dev/null ||
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin bhatti-vmm
if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
