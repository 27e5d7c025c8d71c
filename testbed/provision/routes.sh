#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# Routes and forwarding for one machine of the Vagrant test bed, from testbed/addresses.env: the
# same routes testbed/bed.py gives the namespaces. Run at every boot (vagrant/Vagrantfile,
# run: "always"): nothing here is persisted except the gateways' sysctl file.
#   usage: routes.sh lan|gw1|gw2|remote REPO
# The hosts keep their default route (the provider's management network) and reach the other
# site through their gateway; each gateway reaches the other site through the peer's WAN address
# (the IKE daemon installs no routes: install_routes = no in testbed/strongswan/*/strongswan.conf).
set -euo pipefail
role=${1:?usage: routes.sh ROLE REPO}
repo=${2:?usage: routes.sh ROLE REPO}
# shellcheck source=../addresses.env
. "$repo/testbed/addresses.env"

gateway_sysctls() {
  # Forward between the test networks; rp_filter off as in the namespace test bed (decapsulated
  # packets arrive on the WAN device with LAN source addresses).
  cat > /etc/sysctl.d/60-xfrm-fastpath-testbed.conf <<SYSCTL
net.ipv4.ip_forward = 1
net.ipv4.conf.all.rp_filter = 0
net.ipv4.conf.default.rp_filter = 0
SYSCTL
  sysctl -q -p /etc/sysctl.d/60-xfrm-fastpath-testbed.conf
  # The per-device value counts too (the kernel uses the max of all and the device).
  local dev
  for dev in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > "$dev"; done
}

case "$role" in
  lan) ip route replace "$REMOTE_NET" via "$GW1_LAN" ;;
  remote) ip route replace "$LAN_NET" via "$GW2_LAN" ;;
  gw1) gateway_sysctls; ip route replace "$REMOTE_NET" via "$GW2_WAN" ;;
  gw2) gateway_sysctls; ip route replace "$LAN_NET" via "$GW1_WAN" ;;
  *) echo "routes.sh: unknown role $role" >&2; exit 2 ;;
esac
echo "[routes] $role: $(ip -4 route show | grep -c .) routes, forwarding=$(cat /proc/sys/net/ipv4/ip_forward)"
