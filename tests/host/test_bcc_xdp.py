# SPDX-License-Identifier: GPL-2.0-only
"""BCC compiles an XDP program, attaches it to a veth inside a test bed namespace, and the
program sees the packets that cross that link (counted in a map, read back from Python)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from testbed.bed import ROOT, Testbed

# Runs in a child entered with nsenter --net (so the XDP attach happens inside the namespace,
# and this machine's /sys stays visible to BCC). It prints the packet count as JSON.
CHILD = textwrap.dedent(r'''
    import json, sys, time
    sys.path.insert(0, sys.argv[2])
    from bcc import BPF
    from controller.datapath.loader import Prog, compile_bpf, load_program
    b = compile_bpf(text=r"""
    #include <uapi/linux/bpf.h>
    #include <uapi/linux/if_ether.h>
    #include <uapi/linux/ip.h>
    BPF_ARRAY(seen, u64, 1);
    int count_ipv4(struct xdp_md *ctx) {
        void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) > end || eth->h_proto != __constant_htons(ETH_P_IP))
            return XDP_PASS;
        u32 k = 0;
        u64 *v = seen.lookup(&k);
        if (v) __sync_fetch_and_add(v, 1);
        return XDP_PASS;
    }
    """)
    dev = sys.argv[1]
    b.attach_xdp(dev, load_program(b, "count_ipv4", Prog.XDP), 0)
    try:
        print("attached", flush=True)
        sys.stdin.readline()
        print(json.dumps({"seen": b["seen"][0].value}), flush=True)
    finally:
        b.remove_xdp(dev, 0)
''')


def test_bcc_xdp_in_namespace_sees_packets(bed: Testbed) -> None:
    child = subprocess.Popen(
        [*bed.nsenter_argv("gw1"), sys.executable, "-c", CHILD, "lan", str(ROOT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "attached", f"XDP attach failed: {child.stderr.read()}"
        assert "xdp" in bed.ip("gw1", "link", "show", "dev", "lan").stdout, "XDP shows on the link"
        assert bed.ping("lan", bed.addr("REMOTE_HOST"), count=5), "traffic still forwards"
        out, err = child.communicate("done\n", timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["seen"] >= 5, f"XDP counted the 5 echo requests (and no fewer): {result} {err}"
    assert "xdp" not in bed.ip("gw1", "link", "show", "dev", "lan").stdout, "XDP detached"
