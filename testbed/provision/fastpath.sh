#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# The controller on gw1 of the Vagrant test bed: scripts/install-gateway.sh (the same install a
# real gateway uses) with the interfaces that carry gw1's LAN and WAN addresses, then a check that
# the controller comes up.
#   usage: fastpath.sh REPO
# The provider names the devices (eth1/eth2, ens6/ens7, ...), so they are found by address.
set -euo pipefail
repo=${1:?usage: fastpath.sh REPO}
# shellcheck source=../addresses.env
. "$repo/testbed/addresses.env"
say() { printf '[fastpath] %s\n' "$*"; }

dev_with() {
  ip -o -4 addr show | awk -v a="$1" '{ split($4, p, "/"); if (p[1] == a) { print $2; exit } }'
}
lan_dev=$(dev_with "$GW1_LAN")
wan_dev=$(dev_with "$GW1_WAN")
if [ -z "$lan_dev" ] || [ -z "$wan_dev" ]; then
  say "no device carries $GW1_LAN or $GW1_WAN (the provider's private networks are missing)"
  exit 1
fi

"$repo/scripts/install-gateway.sh" --lan "$lan_dev" --wan "$wan_dev" --enable

# Up means `xfrm-fastpath status` answers: the controller has compiled and attached its programs
# (BCC compiles take a while on a small VM). A restart or a failed unit ends the wait at once.
# Bounded: 300 polls, 1 s apart.
unit=xfrm-fastpath.service
for _ in $(seq 300); do
  if /opt/xfrm-fastpath/.venv/bin/xfrm-fastpath status >/dev/null 2>&1; then
    say "$unit up on lan=$lan_dev wan=$wan_dev"
    /opt/xfrm-fastpath/.venv/bin/xfrm-fastpath status || true
    exit 0
  fi
  state=$(systemctl show -p ActiveState --value "$unit")
  restarts=$(systemctl show -p NRestarts --value "$unit")
  if [ "$state" = failed ] || [ "${restarts:-0}" -gt 0 ]; then
    break
  fi
  sleep 1
done
say "$unit did not come up (state $state, $restarts restarts):"
journalctl -u "$unit" -n 50 --no-pager || true
exit 1
