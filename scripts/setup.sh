#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# One-command set-up of a fresh Debian 12 machine for xfrm-fastpath (run as root; idempotent).
#  - Debian packages: BCC, bpftool, iproute2, qemu, strongSwan, tools for the test beds;
#  - kernel headers BCC can compile with, also for a host kernel that has no headers package;
#  - the pinned Debian kernel for the real-kernel VM test bed (scripts/fetch-kernel.sh);
#  - the xfp_crypto kernel module built for that kernel (scripts/build-kmod.sh);
#  - the virtualenv .venv, made from the system Python with system site packages (for `import bcc`).
set -euo pipefail
cd "$(dirname "$0")/.."
. vm/kernel.env

say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (it installs Debian packages and loads BPF programs)" >&2
  exit 1
fi

PKGS=(
  python3-bpfcc bpfcc-tools libbpfcc bpftool
  python3-venv python3-pip
  iproute2 nftables procps iputils-ping netcat-openbsd tcpdump iperf3
  qemu-system-x86 kmod udev busybox-static
  charon-systemd strongswan-swanctl strongswan-pki libstrongswan-standard-plugins
  clang-format shellcheck
  # the xfp_crypto kernel module (scripts/build-kmod.sh): module BTF needs pahole, and
  # resolve_btfids, built from the kernel source, needs libelf-dev
  make dwarves libelf-dev linux-source-6.1 xz-utils
  # `vagrant validate` of vagrant/Vagrantfile; with the libvirt plugin it checks provider blocks
  vagrant vagrant-libvirt
  prometheus
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# strongSwan's packaged services must not run in the root namespace: the test beds start their
# own charon per namespace.
for unit in strongswan strongswan-starter prometheus; do
  systemctl disable --now "$unit" >/dev/null 2>&1 || true
done
pkill -x prometheus 2>/dev/null || true

# Kernel headers for BCC. The pinned VM kernel's headers double as the host's when the running
# kernel has no headers package of its own (BPF code here uses UAPI headers only).
scripts/fetch-kernel.sh
. /var/cache/xfrm-fastpath/kernel/current.env
host_rel=$(uname -r)
if [ ! -e "/lib/modules/$host_rel/build/Makefile" ]; then
  say "host kernel $host_rel has no headers: pointing BCC at linux-headers-$KERNEL_ABI"
  mkdir -p "/lib/modules/$host_rel"
  ln -sfn "/usr/src/linux-headers-$KERNEL_ABI" "/lib/modules/$host_rel/build"
  ln -sfn "/usr/src/linux-headers-${KERNEL_ABI%-amd64}-common" "/lib/modules/$host_rel/source"
fi

# The xfp_crypto module for the VM kernel, with module BTF (cached; make only rebuilds changes).
scripts/build-kmod.sh "$KERNEL_ABI"

# tracefs, where the tracepoints live (some minimal systems do not mount it).
if [ ! -d /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

# The virtualenv, from the system Python so Debian's python3-bpfcc is importable.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  say "creating .venv (system site packages, for BCC)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
.venv/bin/python -c 'import bcc, pyroute2, prometheus_client, cryptography' \
  || { echo "setup: the virtualenv cannot import its dependencies" >&2; exit 1; }
say "done: .venv ready, VM kernel $KERNEL_ABI cached"
