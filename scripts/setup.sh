#!/usr/bin/env bash
# Install what toa needs on a Debian/Ubuntu machine and start the Docker engine.
# Idempotent: safe to run again. Needs root (or sudo) for apt-get and dockerd.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  docker.io            # builds run in per-distro containers
  debootstrap debian-archive-keyring  # Debian base images (no registry needed), checked against the keyring
  qemu-system-x86      # the lab boots real kernels
  busybox-static       # the lab's guest userland
  gcc libc6-dev make   # the lab's static guest test program
  clang llvm libbpf-dev libelf-dev zlib1g-dev  # the eBPF engine: toa.bpf.o and the static toa-bpf loader
  cpio xz-utils zstd kmod
  openssh-server openssh-client   # the tests' loopback SSH host; the lab fleet's sshd
  qemu-utils e2fsprogs # the lab fleet's disks (qemu-img overlays, mkfs.ext4 -d)
  rpm openssl          # kmod .rpm packages; module signing keys
  shellcheck           # actionlint checks the workflow's scripts with it
  python3-pip python3-venv
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own python3 refuses system-wide pip installs (PEP 668); this machine is set up for toa.
pip_flags=()
if python3 -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")))'; then
  pip_flags+=(--break-system-packages)
fi
python3 -m pip install -q "${pip_flags[@]}" -e '.[test]'

# No systemd on minimal hosts and containers: start dockerd ourselves when it is not answering.
if ! docker info >/dev/null 2>&1; then
  (setsid dockerd >/var/log/toa-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start: see /var/log/toa-dockerd.log" >&2; exit 1; }
fi
echo "toa: setup complete"
