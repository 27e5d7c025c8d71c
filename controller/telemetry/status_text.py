# SPDX-License-Identifier: GPL-2.0-only
"""A `MetricsSnapshot` as the terminal report `xfrm-fastpath status` prints: the figures the
dashboard shows, since the controller started."""

from __future__ import annotations

import time

from controller.telemetry.snapshot import MetricsSnapshot


def _si(n: float) -> str:
    """1234567 -> '1.23M' (status table: fixed width, readable at a glance)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f} ms"


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        # First column left-aligned (names), the others right-aligned (figures).
        out = [cells[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)
        ]
        return (indent + "  ".join(out)).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def _sa_lines(snap: MetricsSnapshot) -> list[str]:
    """The SAs on the fastpath with their crypto backend, then the kernel's SAs that stay on
    the kernel path, and why."""
    out = ["", f"SAs on the fastpath: {len(snap.sas)}"]
    rows = [
        [sa.spi, str(sa.reqid), sa.direction, sa.backend, _si(sa.packets), _bytes(sa.bytes),
         str(sa.sequence)]
        for sa in sorted(snap.sas, key=lambda s: (s.direction != "encap", s.spi))
    ]  # fmt: skip
    if rows:
        head = ["spi", "reqid", "direction", "backend", "packets", "bytes", "sequence"]
        out += _table(head, rows)
    kernel = [st for st in snap.sa_states if not st.offloaded]
    if kernel:
        out.append(f"SAs on the kernel path: {len(kernel)}")
        out += [f"  {st.spi} reqid {st.reqid}: {st.reason}" for st in kernel]
    return out


def format_status(snap: MetricsSnapshot, now: float | None = None) -> str:
    """The snapshot as a terminal report: the figures the dashboard shows, since start."""
    now = time.time() if now is None else now
    out: list[str] = []
    state = "up" if snap.up else "DOWN"
    if snap.last_netlink_event:
        nl = f"last netlink event {max(0.0, now - snap.last_netlink_event):.1f} s ago"
    else:
        nl = "no netlink event yet"
    version = snap.build_info.get("version", "?")
    out.append(
        f"xfrm-fastpath {version}: controller {state}, "
        f"{snap.bpf_programs_attached} BPF programs attached, {nl}"
    )

    out.append("")
    out.append("Hit rate (fastpath / (fastpath + kernel), packets since start)")
    rows = []
    for d in snap.directions():
        ratio = snap.hit_ratio(d)
        rows.append(
            [
                d,
                _si(snap.fastpath_packets_by_direction(d)),
                _si(snap.kernel_packets_by_direction(d)),
                "-" if ratio is None else f"{ratio * 100:.1f} %",
            ]
        )
    out += _table(["direction", "fastpath", "kernel", "hit rate"], rows)

    out.append("")
    out.append("Fastpath")
    rows = [
        [f"{i} {d}", _si(v), _bytes(snap.fastpath_bytes.get((i, d), 0))]
        for (i, d), v in sorted(snap.fastpath_packets.items())
    ]
    out += _table(["interface", "packets", "bytes"], rows)

    out.append("")
    out.append("Handed to the kernel")
    rows = [
        [f"{d} {r}", _si(v), _bytes(snap.kernel_bytes.get((d, r), 0))]
        for (d, r), v in sorted(snap.kernel_packets.items())
        if v
    ]
    out += _table(["reason", "packets", "bytes"], rows) if rows else ["  none"]

    out.append("")
    out.append("Dropped")
    rows = [[f"{d} {r}", _si(v)] for (d, r), v in sorted(snap.drops.items()) if v]
    out += _table(["reason", "packets"], rows) if rows else ["  none"]

    out += _sa_lines(snap)

    out.append("")
    use = snap.flow_entries / snap.flow_capacity * 100 if snap.flow_capacity else 0.0
    out.append(
        f"Flow table: {snap.flow_entries} / {snap.flow_capacity} entries ({use:.1f} %), "
        f"{snap.flow_evictions} evictions"
    )
    h = snap.learn_latency
    out.append(
        f"Learning: {snap.learn_events} flows learned; latency p50 {_ms(h.quantile(0.5))}, "
        f"p90 {_ms(h.quantile(0.9))}, p99 {_ms(h.quantile(0.99))} ({h.count} observed)"
    )
    rej = ", ".join(f"{r} {v}" for r, v in sorted(snap.validation_rejections.items()) if v)
    out.append(f"Validation rejections: {rej or 'none'}")
    inv = ", ".join(f"{c} {v}" for c, v in sorted(snap.invalidations.items()) if v)
    out.append(f"Invalidations: {inv or 'none'}")
    return "\n".join(out) + "\n"
