#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# Install xfrm-fastpath on a Debian 12 gateway (run as root; idempotent: run it again to update).
# Only what a gateway needs, unlike scripts/setup.sh (no qemu, test kernels or dev tools):
#  - Debian packages: BCC, bpftool, iproute2, strongSwan (charon-systemd + swanctl), the running
#    kernel's headers (BCC compiles against them);
#  - the program in /opt/xfrm-fastpath, with a virtualenv made from the system Python with system
#    site packages (Debian's python3-bpfcc is not on PyPI);
#  - the systemd unit (packaging/xfrm-fastpath.service) and /etc/xfrm-fastpath/config.toml
#    (packaging/config.toml; an existing config is kept, only --lan/--wan rewrite its interfaces);
#  - the xfp_crypto kernel module (kmod/, the kernel crypto backend) built for the running kernel
#    by scripts/build-kmod.sh, installed in /lib/modules/$(uname -r)/updates/ (depmod), loaded
#    now and at boot with its crypto dependencies (/etc/modules-load.d/xfrm-fastpath.conf).
#    When it does not build or load, the service still installs and runs, on the BPF backend
#    (ChaCha20-Poly1305 on the BPF AEAD; AES-GCM SAs stay on the kernel path), and says so.
#
# usage: install-gateway.sh [--lan IF[,IF..]] [--wan IF[,IF..]] [--enable] [--no-packages]
#                           [--no-kmod] [--kver KVER] [--root DIR]
#   --lan/--wan  the clear-text and ESP-side interfaces to put in the config
#   --enable     enable the service and (re)start it
#   --no-packages  skip apt (the packages are already there)
#   --no-kmod    neither build nor load the kernel crypto module (the BPF backend only)
#   --kver KVER  build the module for this kernel (default: the running one, $(uname -r)), e.g.
#                the one a kernel update will boot; it is loaded now only if it is running
#   --root DIR   stage the files under DIR instead of / (no apt, no virtualenv, no systemctl;
#                the module's build, install and load are printed, not run): what
#                tests/host/test_packaging.py uses to check the installed tree
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)

PREFIX=/opt/xfrm-fastpath  # also in packaging/xfrm-fastpath.service (ExecStart)
UNIT=xfrm-fastpath.service
lan="" wan="" enable=0 packages=1 root="" kmod=1 kver=$(uname -r)
# What the module needs loaded before it (tests/vm/test_vm_kcrypto.py loads the same): the arch
# ChaCha20 and Poly1305 it links against, and aesni-intel, whose synchronous AES-GCM it
# allocates by name (a name is no symbol dependency, so modprobe would not load it).
KMOD=xfp_crypto
KMOD_DEPS=(chacha_x86_64 poly1305_x86_64 aesni_intel)

say() { printf '[install-gateway] %s\n' "$*"; }
die() { printf 'install-gateway: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --lan) lan=${2:?--lan needs interface names}; shift 2 ;;
    --wan) wan=${2:?--wan needs interface names}; shift 2 ;;
    --enable) enable=1; shift ;;
    --no-packages) packages=0; shift ;;
    --no-kmod) kmod=0; shift ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --kver) kver=${2:?--kver needs a kernel release}; shift 2 ;;
    -h|--help) sed -n '3,28p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

# "eth1,eth2" -> ["eth1", "eth2"], refusing anything that is not an interface name (IFNAMSIZ 16,
# include/uapi/linux/if.h), so the TOML written below is always well-formed.
toml_list() {
  local out="" name
  local -a names
  IFS=, read -r -a names <<< "$1"
  for name in "${names[@]}"; do
    [[ $name =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "not an interface name: '$name'"
    out+="${out:+, }\"$name\""
  done
  printf '[%s]' "$out"
}

if [ -n "$root" ]; then
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
  packages=0
  [ "$enable" -eq 0 ] || die "--enable cannot be used with --root"
elif [ "$(id -u)" -ne 0 ]; then
  die "run as root (it installs packages and a system service)"
fi

# -- Debian packages ----------------------------------------------------------------------------
if [ "$packages" -eq 1 ]; then
  pkgs=(
    python3-bpfcc libbpfcc bpftool python3-venv python3-pip
    iproute2 kmod
    charon-systemd strongswan-swanctl libstrongswan-standard-plugins
  )
  if [ "$kmod" -eq 1 ]; then
    # scripts/build-kmod.sh: kbuild and gcc (with the headers), pahole for module BTF, and the
    # kernel source's resolve_btfids (Debian's kbuild lacks it; it needs libelf-dev).
    pkgs+=(make gcc dwarves libelf-dev linux-source-6.1 xz-utils binutils)
  fi
  headers="linux-headers-$kver"
  if apt-cache show "$headers" >/dev/null 2>&1; then
    pkgs+=("$headers")
  elif [ ! -e "/lib/modules/$kver/build/Makefile" ]; then
    say "warning: no $headers package and no headers installed: BCC will not compile"
  fi
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# -- the program and its virtualenv --------------------------------------------------------------
dest=$root$PREFIX
mkdir -p "$dest"
if [ "$(cd "$dest" && pwd -P)" != "$(cd "$src" && pwd -P)" ]; then
  # Replace each part whole, so files removed upstream do not linger. The install is editable
  # (below) because the controller finds bpf/ next to controller/.
  for part in controller bpf kmod packaging pyproject.toml README.md docs; do
    [ -e "$src/$part" ] || continue
    rm -rf "${dest:?}/$part"
    cp -R "$src/$part" "$dest/$part"
  done
  # The module's builder, to rebuild after a kernel update (kmod/README.md).
  install -D -m 0755 "$src/scripts/build-kmod.sh" "$dest/scripts/build-kmod.sh"
  rm -rf "$dest/bpf/tests"  # test and bench programs: nothing on a gateway loads them
  find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
fi
if [ -z "$root" ]; then
  if [ ! -x "$dest/.venv/bin/python" ] || ! "$dest/.venv/bin/python" -c 'import bcc' 2>/dev/null; then
    say "creating $dest/.venv (system site packages, for BCC)"
    rm -rf "$dest/.venv"
    /usr/bin/python3 -m venv --system-site-packages "$dest/.venv"
  fi
  "$dest/.venv/bin/pip" install -q --disable-pip-version-check -e "$dest"
  "$dest/.venv/bin/python" -c 'import bcc, pyroute2, prometheus_client, cryptography' \
    || die "the virtualenv cannot import its dependencies"
fi

# -- unit and config ----------------------------------------------------------------------------
install -D -m 0644 "$src/packaging/$UNIT" "$root/etc/systemd/system/$UNIT"
dropin=$root/etc/systemd/system/$UNIT.d/restart-backoff.conf
# RestartSteps=/RestartMaxDelaySec= exist from systemd 254 on; older versions would log
# "Unknown key" on every reload, so the drop-in goes only where it is understood.
sdver=$(systemctl --version 2>/dev/null | awk 'NR == 1 {print $2}')
if [[ ${sdver:-0} =~ ^[0-9]+$ ]] && [ "${sdver:-0}" -ge 254 ]; then
  install -D -m 0644 "$src/packaging/restart-backoff.conf" "$dropin"
else
  rm -f "$dropin"
fi

cfg=$root/etc/xfrm-fastpath/config.toml
mkdir -p "$(dirname "$cfg")"
if [ ! -e "$cfg" ]; then
  install -m 0644 "$src/packaging/config.toml" "$cfg"
  say "installed $cfg"
else
  say "keeping $cfg"
fi
# Rewrite only the `lan = [...]` / `wan = [...]` lines of the [interfaces] table.
set_ifaces() {
  local key=$1 list
  list=$(toml_list "$2")
  awk -v key="$key" -v list="$list" '
    /^\[/ { section = $0 }
    section == "[interfaces]" && $0 ~ "^" key "[ \t]*=" { print key " = " list; done = 1; next }
    { print }
    END { if (!done) exit 3 }
  ' "$cfg" > "$cfg.new" || { rm -f "$cfg.new"; die "$cfg has no [interfaces] $key line to set"; }
  mv "$cfg.new" "$cfg"
}
[ -z "$lan" ] || set_ifaces lan "$lan"
[ -z "$wan" ] || set_ifaces wan "$wan"

# The controller's own validator, before systemd ever starts it with a bad file.
py=$dest/.venv/bin/python
[ -x "$py" ] || py=$src/.venv/bin/python
if [ -x "$py" ]; then
  (cd "$dest" && "$py" -c 'import sys; from controller.config import load_config; load_config(sys.argv[1])' "$cfg") \
    || die "$cfg does not validate"
fi

# -- the kernel crypto module (kmod/README.md) ----------------------------------------------------
[[ $kver =~ ^[A-Za-z0-9._+-]+$ ]] || die "not a kernel release: '$kver'"
modules_conf=$root/etc/modules-load.d/xfrm-fastpath.conf
kmod_note=""
# Run a step that changes the system, or (--root) only say what it would run.
sys() {
  if [ -n "$root" ]; then
    say "would run: $*"
  else
    "$@"
  fi
}
# Build, install and load the module for the running kernel; 1 (after saying why) when any step
# fails, with nothing loaded at boot that would not load.
install_kmod() {
  local ko=/var/cache/xfrm-fastpath/kernel/kmod/$kver/$KMOD.ko
  local mod_dir=/lib/modules/$kver/updates
  # linux-headers-$kver (installed above when the archive has it) is what the build needs first.
  [ -e "/usr/src/linux-headers-$kver/Makefile" ] || {
    kmod_note="no headers for $kver in /usr/src/linux-headers-$kver (linux-headers-$kver)"
    return 1
  }
  say "building $KMOD for $kver (scripts/build-kmod.sh)"
  sys "$dest/scripts/build-kmod.sh" "$kver" || { kmod_note="it did not build for $kver"; return 1; }
  sys install -D -m 0644 "$ko" "$mod_dir/$KMOD.ko" || { kmod_note="it did not install"; return 1; }
  sys depmod -a "$kver" || { kmod_note="depmod failed"; return 1; }
  mkdir -p "$(dirname "$modules_conf")"
  {
    echo "# xfrm-fastpath's kernel crypto backend (kmod/README.md), written by install-gateway.sh:"
    echo "# its crypto dependencies first, then the module."
    printf '%s\n' "${KMOD_DEPS[@]}" "$KMOD"
  } > "$modules_conf"
  if [ "$kver" != "$(uname -r)" ]; then
    say "$KMOD installed for $kver: it loads when that kernel boots"
    return 0
  fi
  local m
  for m in "${KMOD_DEPS[@]}"; do
    sys modprobe "$m" || say "warning: modprobe $m failed (AES-GCM or SIMD may be unavailable)"
  done
  # An older build stays loaded while a controller holds /dev/xfp_crypto: the new one loads at
  # the next boot, or after `systemctl stop xfrm-fastpath; rmmod xfp_crypto`.
  if [ -z "$root" ] && [ -d "/sys/module/$KMOD" ]; then
    say "$KMOD is loaded already: a rebuilt module takes over at the next load"
  else
    sys modprobe "$KMOD" || {
      rm -f "$modules_conf"
      kmod_note="it did not load (Secure Boot refusing unsigned modules? see dmesg)"
      return 1
    }
  fi
}
if [ "$kmod" -eq 0 ]; then
  say "kernel crypto module skipped (--no-kmod): the controller runs on the BPF backend"
elif ! install_kmod; then
  say "warning: the $KMOD module is not in use: $kmod_note. The service runs on the BPF backend"
  say "  ([crypto] backend = auto): ChaCha20-Poly1305 on the BPF AEAD, AES-GCM SAs on the kernel path"
  if [ -x "$py" ] && [ "$(cd "$dest" && "$py" -c 'import sys; from controller.config import load_config; print(load_config(sys.argv[1]).crypto_backend)' "$cfg")" = kernel ]; then
    say "warning: $cfg says [crypto] backend = kernel: the controller will refuse to start without the module"
  fi
else
  say "kernel crypto backend: $KMOD for $kver, loaded at boot ($modules_conf)"
fi

if [ -z "$root" ]; then
  systemctl daemon-reload
  if [ "$enable" -eq 1 ]; then
    systemctl enable -q "$UNIT"
    systemctl restart "$UNIT"
    say "started $UNIT (journalctl -u $UNIT)"
  fi
fi
say "done: $PREFIX, /etc/systemd/system/$UNIT, /etc/xfrm-fastpath/config.toml"
