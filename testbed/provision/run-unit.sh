#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# Start the controller the way packaging/xfrm-fastpath.service does, where systemd is not the one
# starting it (network namespaces of the test beds, the VM test bed): the unit's own ExecStart
# and privileges, read from the unit file itself, so the test beds run what gateways run.
#   usage: run-unit.sh [--netns NAME] [--config PATH]
#   - ExecStart, with the install prefix /opt/xfrm-fastpath mapped to this checkout and its
#     --config replaced when --config is given;
#   - uid 0 holding exactly CapabilityBoundingSet (inheritable and bounding set, so exec gives
#     uid 0 exactly these, capabilities(7)), and NoNewPrivileges;
#   - inside network namespace NAME (nsenter --net, which keeps this machine's /sys for BCC).
# It execs: the caller's child IS the controller, so SIGTERM (the unit's KillSignal) reaches it.
# Not reproduced: the file system sandboxing and LimitMEMLOCK=infinity (raising it needs
# CAP_SYS_RESOURCE; a lower limit can only refuse more, never less).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
unit=$repo/packaging/xfrm-fastpath.service
netns="" config=""
while [ $# -gt 0 ]; do
  case "$1" in
    --netns) netns=${2:?--netns needs a name}; shift 2 ;;
    --config) config=${2:?--config needs a path}; shift 2 ;;
    *) echo "run-unit.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

key() { sed -n "s/^$1=//p" "$unit" | tail -n 1; }
read -r -a argv <<< "$(key ExecStart)"
read -r -a caps <<< "$(key CapabilityBoundingSet)"
if [ ${#argv[@]} -eq 0 ] || [ ${#caps[@]} -eq 0 ]; then
  echo "run-unit.sh: no ExecStart or CapabilityBoundingSet in $unit" >&2
  exit 1
fi
argv[0]=${argv[0]/#\/opt\/xfrm-fastpath/$repo}
if [ -n "$config" ]; then
  for i in "${!argv[@]}"; do
    if [ "${argv[$i]}" = --config ]; then argv[i + 1]=$config; fi
  done
fi
capset=-all
for c in "${caps[@]}"; do
  c=${c#CAP_}
  capset+=",+${c,,}"
done

pre=()
[ -z "$netns" ] || pre=(nsenter "--net=/run/netns/$netns")
exec "${pre[@]}" setpriv --inh-caps="$capset" --bounding-set="$capset" --no-new-privs -- "${argv[@]}"
