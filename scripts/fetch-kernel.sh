#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# Fetch, once, the Debian kernel the VM test bed boots, and its headers (for BCC in the guest).
# The version is pinned in vm/kernel.env; if the archive no longer has it, take the ABI that
# linux-image-amd64 currently depends on, and say so. The unpacked kernel and its module index
# live under /var/cache/xfrm-fastpath/kernel, shared by every checkout on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
. vm/kernel.env
CACHE=/var/cache/xfrm-fastpath/kernel
mkdir -p "$CACHE"
say() { printf '[fetch-kernel] %s\n' "$*"; }

# The guest sees the unpacked module tree as /lib/modules/ABI (virtme-ng links it there), so BCC
# in the guest finds its kernel headers through build/source links inside that tree, pointing at
# the headers packages installed on this machine (which the guest sees through its 9p root).
link_headers() {
  local mods="$CACHE/root/lib/modules/$1"
  [ -d "$mods" ] || return 0
  ln -sfn "/usr/src/linux-headers-$1" "$mods/build"
  ln -sfn "/usr/src/linux-headers-${1%-amd64}-common" "$mods/source"
}

abi=$KERNEL_ABI
if [ -f "$CACHE/current.env" ]; then
  . "$CACHE/current.env"
  if [ -f "$CACHE/root/boot/vmlinuz-$KERNEL_ABI" ] && [ -d "/usr/src/linux-headers-$KERNEL_ABI" ]; then
    link_headers "$KERNEL_ABI"
    say "cached: $KERNEL_ABI"
    exit 0
  fi
  abi=$KERNEL_ABI
fi

export DEBIAN_FRONTEND=noninteractive
have_pkg() { apt-cache show "$1" >/dev/null 2>&1; }
if ! have_pkg "linux-image-$abi"; then
  apt-get update -qq
fi
if ! have_pkg "linux-image-$abi"; then
  current=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6/ {print $2}' \
            | sed 's/^linux-image-//' | sort -V | tail -1)
  [ -n "$current" ] || { echo "fetch-kernel: no linux-image-6.1 package in the archive" >&2; exit 1; }
  say "pinned $abi is gone from the archive; falling back to $current"
  abi=$current
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
say "downloading linux-image-$abi"
(cd "$tmp" && apt-get download -qq "linux-image-$abi")
rm -rf "$CACHE/root"
mkdir -p "$CACHE/root"
dpkg -x "$tmp"/linux-image-"$abi"_*.deb "$CACHE/root"
depmod -b "$CACHE/root" "$abi"
cp "$tmp"/linux-image-"$abi"_*.deb "$CACHE/"

# Headers for BCC inside the guest (the guest sees this machine's /usr/src and /lib/modules).
if ! dpkg-query -W -f='${Status}' "linux-headers-$abi" 2>/dev/null | grep -q 'install ok installed'; then
  say "installing linux-headers-$abi"
  apt-get install -y -qq --no-install-recommends "linux-headers-$abi" >/dev/null
fi
link_headers "$abi"
printf 'KERNEL_ABI=%s\n' "$abi" > "$CACHE/current.env"
say "ready: $CACHE/root/boot/vmlinuz-$abi"
