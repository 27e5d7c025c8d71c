#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# Build kmod/xfp_crypto.ko (ESP AEAD kfuncs) against the VM kernel's headers, with module BTF,
# the way DKMS builds a module: make -C <headers> M=<dir>. Idempotent and cached: what it makes
# lives under /var/cache/xfrm-fastpath/kernel (which the VM test bed exports to the guest), and a
# second run only re-runs make, which rebuilds nothing when nothing changed.
#
#   scripts/build-kmod.sh [KVER]      (default: the cached VM kernel, scripts/fetch-kernel.sh)
#
# On a gateway (scripts/install-gateway.sh) KVER is the running kernel: its headers come from
# linux-headers-$(uname -r) and its BTF from /sys/kernel/btf/vmlinux, so no kernel image is needed.
#
# kfuncs need module BTF, and Kbuild makes it (scripts/Makefile.modfinal, cmd_btf_ko) only when
#  - pahole is installed (Debian's dwarves),
#  - resolve_btfids exists: Debian's linux-kbuild lacks it, so it is built here once from the
#    linux-source-6.1 package (tools/bpf/resolve_btfids; needs libelf-dev) and passed as
#    RESOLVE_BTFIDS=,
#  - <headers>/vmlinux holds the target kernel's BTF: a headers-only tree has none. It is taken
#    from the packaged kernel image itself (scripts/extract-vmlinux from linux-source, then the
#    .BTF section of the ELF): the same bytes as the running kernel's /sys/kernel/btf/vmlinux
#    (tests/vm/test_vm_kcrypto.py checks that), with no VM boot and nothing but Debian packages,
#    so a fresh machine gets it in seconds. <headers>/vmlinux is a link to that file.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=/var/cache/xfrm-fastpath/kernel
say() { printf '[build-kmod] %s\n' "$*"; }
die() { printf 'build-kmod: %s\n' "$*" >&2; exit 1; }

if [ $# -ge 1 ]; then
  KVER=$1
else
  [ -f "$CACHE/current.env" ] || die "no VM kernel cached: run scripts/fetch-kernel.sh first"
  # shellcheck source=/dev/null
  . "$CACHE/current.env"
  KVER=$KERNEL_ABI
fi
KDIR=/usr/src/linux-headers-$KVER
VMLINUZ=$CACHE/root/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || [ ! -f "/boot/vmlinuz-$KVER" ] || VMLINUZ=/boot/vmlinuz-$KVER  # a gateway's
# The running kernel exports its own BTF: the same bytes the image's .BTF section holds.
RUNNING_BTF=""
if [ "$KVER" = "$(uname -r)" ] && [ -r /sys/kernel/btf/vmlinux ]; then
  RUNNING_BTF=/sys/kernel/btf/vmlinux
fi
[ -f "$KDIR/Makefile" ] || die "no headers at $KDIR: install linux-headers-$KVER (scripts/fetch-kernel.sh)"
[ -n "$RUNNING_BTF" ] || [ -f "$VMLINUZ" ] || die "no kernel image $VMLINUZ: run scripts/fetch-kernel.sh"
command -v pahole >/dev/null || die "pahole missing: install dwarves (scripts/setup.sh)"
SRC_TAR=$(ls /usr/src/linux-source-6.1.tar.xz 2>/dev/null || true)
[ -n "$SRC_TAR" ] || die "no /usr/src/linux-source-6.1.tar.xz: install linux-source-6.1 (scripts/setup.sh)"

TOOLS=$CACHE/kmod-tools
RESOLVE_BTFIDS=$TOOLS/resolve_btfids
EXTRACT=$TOOLS/extract-vmlinux
if [ ! -x "$RESOLVE_BTFIDS" ] || [ ! -x "$EXTRACT" ]; then
  say "building resolve_btfids from $SRC_TAR (once)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  top=$(basename "$SRC_TAR" .tar.xz) # Debian's tarball unpacks to linux-source-6.1/
  tar -xJf "$SRC_TAR" -C "$tmp" "$top/tools" "$top/scripts/extract-vmlinux" "$top/scripts/bpf_doc.py"
  make -s -C "$tmp/$top/tools/bpf/resolve_btfids" -j"$(nproc)" >/dev/null
  mkdir -p "$TOOLS"
  install -m 755 "$tmp/$top/tools/bpf/resolve_btfids/resolve_btfids" "$RESOLVE_BTFIDS"
  install -m 755 "$tmp/$top/scripts/extract-vmlinux" "$EXTRACT"
fi

BTF=$CACHE/vmlinux-$KVER.btf
if [ -n "$RUNNING_BTF" ]; then
  if ! cmp -s "$RUNNING_BTF" "$BTF"; then
    say "taking the BTF of $KVER from $RUNNING_BTF"
    cat "$RUNNING_BTF" > "$BTF.tmp"
    chmod 644 "$BTF.tmp"
    mv "$BTF.tmp" "$BTF"
  fi
elif [ ! -s "$BTF" ] || [ "$VMLINUZ" -nt "$BTF" ]; then
  say "extracting the BTF of $KVER from $VMLINUZ"
  elf=$(mktemp)
  "$EXTRACT" "$VMLINUZ" > "$elf" || { rm -f "$elf"; die "extract-vmlinux failed on $VMLINUZ"; }
  objcopy -O binary --only-section=.BTF "$elf" "$BTF.tmp"
  rm -f "$elf"
  # struct btf_header starts with magic 0xeb9f (little-endian).
  [ "$(head -c2 "$BTF.tmp" | od -An -tx1 | tr -d ' ')" = "9feb" ] \
    || { rm -f "$BTF.tmp"; die "no .BTF section in $VMLINUZ (kernel built without CONFIG_DEBUG_INFO_BTF?)"; }
  chmod 644 "$BTF.tmp"
  mv "$BTF.tmp" "$BTF"
fi
if [ ! -e "$KDIR/vmlinux" ] || [ -L "$KDIR/vmlinux" ]; then
  ln -sfn "$BTF" "$KDIR/vmlinux"
fi

# Out of the tree: the sources are copied (only when changed, so make's timestamps hold).
BUILD=$CACHE/kmod/$KVER
mkdir -p "$BUILD"
for f in kmod/xfp_crypto.c kmod/Kbuild; do
  cmp -s "$f" "$BUILD/$(basename "$f")" || cp "$f" "$BUILD/"
done
say "make -C $KDIR M=$BUILD"
make -s -C "$KDIR" M="$BUILD" XFP_INCLUDE="$ROOT/bpf/include" RESOLVE_BTFIDS="$RESOLVE_BTFIDS" \
  modules
KO=$BUILD/xfp_crypto.ko
sections=$(readelf -S "$KO")
grep -q '\.BTF ' <<<"$sections" || die "$KO has no .BTF section: the kfuncs would not register"
grep -q '\.BTF_ids' <<<"$sections" || die "$KO has no .BTF_ids section"
say "ready: $KO"
