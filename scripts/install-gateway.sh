#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# Install xfrm-fastpath on a Debian 12 gateway (run as root; idempotent: run it again to update).
# Only what a gateway needs, unlike scripts/setup.sh (no qemu, test kernels or dev tools):
#  - Debian packages: BCC, bpftool, iproute2, strongSwan (charon-systemd + swanctl), the running
#    kernel's headers (BCC compiles against them);
#  - the program in /opt/xfrm-fastpath, with a virtualenv made from the system Python with system
#    site packages (Debian's python3-bpfcc is not on PyPI);
#  - the systemd unit (packaging/xfrm-fastpath.service) and /etc/xfrm-fastpath/config.toml
#    (packaging/config.toml; an existing config is kept, only --lan/--wan rewrite its interfaces).
#
# usage: install-gateway.sh [--lan IF[,IF..]] [--wan IF[,IF..]] [--enable] [--no-packages]
#                           [--root DIR]
#   --lan/--wan  the clear-text and ESP-side interfaces to put in the config
#   --enable     enable the service and (re)start it
#   --no-packages  skip apt (the packages are already there)
#   --root DIR   stage the files under DIR instead of / (no apt, no virtualenv, no systemctl):
#                what tests/host/test_packaging.py uses to check the installed tree
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)

PREFIX=/opt/xfrm-fastpath  # also in packaging/xfrm-fastpath.service (ExecStart)
UNIT=xfrm-fastpath.service
lan="" wan="" enable=0 packages=1 root=""

say() { printf '[install-gateway] %s\n' "$*"; }
die() { printf 'install-gateway: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --lan) lan=${2:?--lan needs interface names}; shift 2 ;;
    --wan) wan=${2:?--wan needs interface names}; shift 2 ;;
    --enable) enable=1; shift ;;
    --no-packages) packages=0; shift ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    -h|--help) sed -n '3,19p' "$0"; exit 0 ;;
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
  headers="linux-headers-$(uname -r)"
  if apt-cache show "$headers" >/dev/null 2>&1; then
    pkgs+=("$headers")
  elif [ ! -e "/lib/modules/$(uname -r)/build/Makefile" ]; then
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
  for part in controller bpf packaging pyproject.toml README.md docs; do
    [ -e "$src/$part" ] || continue
    rm -rf "${dest:?}/$part"
    cp -R "$src/$part" "$dest/$part"
  done
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

if [ -z "$root" ]; then
  systemctl daemon-reload
  if [ "$enable" -eq 1 ]; then
    systemctl enable -q "$UNIT"
    systemctl restart "$UNIT"
    say "started $UNIT (journalctl -u $UNIT)"
  fi
fi
say "done: $PREFIX, /etc/systemd/system/$UNIT, /etc/xfrm-fastpath/config.toml"
