#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# Render one gateway's strongSwan configuration from the address plan, for machines that run
# strongSwan as a service (vagrant/ provisioning). The namespace test beds use the same files
# through testbed/ike.py.
#   usage: render.sh gw1|gw2 OUTDIR [RUNDIR]     (SWAN_PSK from the environment; SWAN_ESP,
#          the CHILD_SA's ESP proposal, defaults to testbed/ike.py's ESP_PROPOSALS)
#   then:  STRONGSWAN_CONF=OUTDIR/strongswan.conf charon-systemd &
#          swanctl --load-all --file OUTDIR/swanctl.conf --uri unix://RUNDIR/charon.vici
#   On a Debian machine with AppArmor (swanctl's profile allows only /run/charon.vici and config
#   under /etc/swanctl, /etc/strongswan.d), use RUNDIR=/run and install the two files into
#   /etc/strongswan.d/ and /etc/swanctl/conf.d/ instead: testbed/provision/strongswan.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
role=${1:?usage: render.sh gw1|gw2 OUTDIR [RUNDIR]}
out=${2:?usage: render.sh gw1|gw2 OUTDIR [RUNDIR]}
[ -d "$here/$role" ] || { echo "render.sh: unknown role $role" >&2; exit 2; }
: "${SWAN_PSK:?set SWAN_PSK to the pre-shared key}"
set -a
# shellcheck source=../addresses.env
. "$here/../addresses.env"
SWAN_RUNDIR=${3:-$out}
SWAN_ESP=${SWAN_ESP:-chacha20poly1305-x25519}
set +a
mkdir -p "$out" "$SWAN_RUNDIR"
# shellcheck disable=SC2016 # the ${...} are envsubst's, not the shell's
vars='${GW1_WAN} ${GW2_WAN} ${LAN_NET} ${REMOTE_NET} ${SWAN_PSK} ${SWAN_RUNDIR} ${SWAN_ESP}'
for f in strongswan.conf swanctl.conf; do
  envsubst "$vars" < "$here/$role/$f" > "$out/$f"
done
chmod 600 "$out/swanctl.conf"
