#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# End-to-end check of the Vagrant test bed, run on the lan machine once all four are up
# (`vagrant provision lan --provision-with e2e`): the remote host answers through the tunnel.
# The first packets trigger the IKE negotiation (start_action = trap), so allow a few tries.
#   usage: e2e.sh REPO
set -euo pipefail
repo=${1:?usage: e2e.sh REPO}
# shellcheck source=../addresses.env
. "$repo/testbed/addresses.env"
for try in 1 2 3 4 5; do
  if ping -c 3 -i 0.2 -W 2 -q "$REMOTE_HOST"; then
    echo "[e2e] $LAN_HOST -> $REMOTE_HOST through gw1/gw2: ok (try $try)"
    exit 0
  fi
done
echo "[e2e] $REMOTE_HOST does not answer; see 'swanctl --list-sas' on gw1 and gw2" >&2
exit 1
