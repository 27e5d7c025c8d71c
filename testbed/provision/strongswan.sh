#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# strongSwan on a gateway of the Vagrant test bed, configured from THE test bed's files:
# testbed/strongswan/ROLE/{strongswan,swanctl}.conf rendered by testbed/strongswan/render.sh,
# exactly as the namespace and VM test beds use them (no second copy).
#   usage: SWAN_PSK=... strongswan.sh gw1|gw2 REPO
# On a real machine the rendered files go where Debian's strongSwan reads them anyway, so the
# packaged strongswan.service (charon-systemd, then `swanctl --load-all`) runs unchanged:
#   strongswan.conf -> /etc/strongswan.d/xfrm-fastpath-testbed.conf (included by strongswan.conf)
#   swanctl.conf    -> /etc/swanctl/conf.d/xfrm-fastpath-testbed.conf (included by swanctl.conf)
# and the daemon's run directory is /run, so the vici socket is /run/charon.vici: Debian's
# AppArmor profile for swanctl (/etc/apparmor.d/usr.sbin.swanctl, enforcing) allows only that
# socket and only config under /etc/swanctl and /etc/strongswan.d.
set -euo pipefail
role=${1:?usage: strongswan.sh gw1|gw2 REPO}
repo=${2:?usage: strongswan.sh gw1|gw2 REPO}
: "${SWAN_PSK:?set SWAN_PSK}"
say() { printf '[strongswan] %s\n' "$*"; }

pkgs=(charon-systemd strongswan-swanctl libstrongswan-standard-plugins gettext-base)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
SWAN_PSK=$SWAN_PSK "$repo/testbed/strongswan/render.sh" "$role" "$out" /run
install -D -m 0644 "$out/strongswan.conf" /etc/strongswan.d/xfrm-fastpath-testbed.conf
install -D -m 0600 "$out/swanctl.conf" /etc/swanctl/conf.d/xfrm-fastpath-testbed.conf

systemctl enable -q strongswan.service
systemctl restart strongswan.service
# The unit's ExecStartPost already ran `swanctl --load-all`; check the connection is there.
conns=$(swanctl --list-conns)
grep -q "^$role-" <<< "$conns" || { say "connection $role-* not loaded:"; echo "$conns"; exit 1; }
say "$role: strongSwan up, $(grep -c '^[a-z0-9-]*:' <<< "$conns") connection(s) loaded"
