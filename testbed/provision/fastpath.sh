#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# The controller on gw1 of the Vagrant test bed: scripts/install-gateway.sh (the same install a
# real gateway uses) with the interfaces that carry gw1's LAN and WAN addresses, then a check that
# the service stays up.
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

# Active now, and still active a few seconds later (a bad start fails fast: Restart= would hide
# it behind "activating"). Bounded: 30 polls, 1 s apart.
unit=xfrm-fastpath.service
for _ in $(seq 30); do
  state=$(systemctl show -p ActiveState --value "$unit")
  restarts=$(systemctl show -p NRestarts --value "$unit")
  if [ "$state" = active ] && [ "${restarts:-0}" -eq 0 ]; then
    up_since=$(systemctl show -p ActiveEnterTimestampMonotonic --value "$unit")
    now=$(awk '{ printf "%d", $1 * 1000000 }' /proc/uptime)
    if [ $((now - up_since)) -ge 5000000 ]; then
      say "$unit active on lan=$lan_dev wan=$wan_dev"
      exit 0
    fi
  fi
  sleep 1
done
say "$unit is not staying up (state $state, $restarts restarts):"
journalctl -u "$unit" -n 50 --no-pager || true
exit 1
