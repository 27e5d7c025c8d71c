# SPDX-License-Identifier: GPL-2.0-only
"""BPF_PROG_TEST_RUN through the raw bpf(2) syscall, for BCC 0.26 (which has no wrapper).

The kernel runs the program `repeat` times on a copy of `data` and reports the verdict, the
packet as the program left it (after adjust_head/tail too), and the mean run time in ns
(include/uapi/linux/bpf.h, `union bpf_attr` member `test`; net/bpf/test_run.c,
bpf_prog_test_run_xdp()). XDP test runs give the program XDP_PACKET_HEADROOM (256 B) in front of
the data and a page's tailroom behind it, so adjust_head/adjust_tail work as on a real driver.

    b = compile_bpf("tests/test_aead.c")                 # controller/datapath/loader.py
    fn = load_program(b, "xfp_aead_test", Prog.XDP)
    retval, out, ns = prog_test_run(fn, frame, repeat=1000)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# include/uapi/linux/bpf.h: enum bpf_cmd
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15

# arch/*/entry/syscalls: __NR_bpf
_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361}

# Room for adjust_tail growth: the kernel refuses (-ENOSPC) when data_size_out is too small.
OUT_SLACK = 4096


class _TestAttr(ctypes.Structure):
    """The `test` member of union bpf_attr (include/uapi/linux/bpf.h):

    struct {
        __u32 prog_fd; __u32 retval; __u32 data_size_in; __u32 data_size_out;
        __aligned_u64 data_in; __aligned_u64 data_out;
        __u32 repeat; __u32 duration; __u32 ctx_size_in; __u32 ctx_size_out;
        __aligned_u64 ctx_in; __aligned_u64 ctx_out;
        __u32 flags; __u32 cpu; __u32 batch_size;
    } test;
    """

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (include/uapi/linux/bpf.h, as of 6.x), up to verified_insns (5.16+)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
        ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    """struct bpf_map_info (include/uapi/linux/bpf.h), its stable head."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    """The `info` member of union bpf_attr: { __u32 bpf_fd; __u32 info_len; __u64 info; }."""

    _fields_ = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfTestRunError(OSError):
    """The kernel refused the test run (errno carried, e.g. EINVAL for a bad size)."""


def _nr_bpf() -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfTestRunError(0, f"unknown bpf(2) syscall number on {platform.machine()}")
    return nr


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> None:
    """bpf(2) with `attr`; BpfTestRunError naming `what` on failure."""
    ret = _libc.syscall(
        ctypes.c_long(_nr_bpf()),
        ctypes.c_long(cmd),
        ctypes.byref(attr),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise BpfTestRunError(err, f"{what}: {os.strerror(err)}")


def prog_info(fd: int | object) -> dict[str, int | str]:
    """BPF_OBJ_GET_INFO_BY_FD for a program: id, name, xlated/jited sizes in bytes, and
    verified_insns (what the verifier walked; 0 on kernels before 5.16)."""
    info = _ProgInfo()
    attr = _InfoAttr()
    attr.bpf_fd = int(getattr(fd, "fd", fd))
    attr.info_len = ctypes.sizeof(info)
    attr.info = ctypes.addressof(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
    return {
        "id": info.id,
        "name": info.name.decode(errors="replace"),
        "xlated_bytes": info.xlated_prog_len,
        "jited_bytes": info.jited_prog_len,
        "insns": info.xlated_prog_len // 8,
        "verified_insns": info.verified_insns,
    }


def map_info(fd: int) -> dict[str, int | str]:
    """BPF_OBJ_GET_INFO_BY_FD for a map: type, id, key/value sizes, max_entries, flags, name,
    and its BTF (btf_id 0: none)."""
    info = _MapInfo()
    attr = _InfoAttr()
    attr.bpf_fd = int(fd)
    attr.info_len = ctypes.sizeof(info)
    attr.info = ctypes.addressof(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD (map)")
    out: dict[str, int | str] = {k: getattr(info, k) for k, _ in _MapInfo._fields_ if k != "name"}
    out["name"] = info.name.decode(errors="replace")
    return out


def prog_test_run(
    fd: int | object, data: bytes, repeat: int = 1, out_size: int | None = None
) -> tuple[int, bytes, int]:
    """Run the loaded program `fd` on `data`; return (retval, output bytes, mean ns per run).

    `fd` is a program fd or BCC's `Function` (what `BPF.load_func` returns; its `.fd`).
    `repeat` > 1 makes the kernel loop in place (the same input each time, re-copied only
    once), so the duration is the program's cost without syscall overhead. `out_size`
    defaults to len(data) + OUT_SLACK.
    """
    if out_size is None:
        out_size = len(data) + OUT_SLACK
    inbuf = ctypes.create_string_buffer(bytes(data), len(data))
    outbuf = ctypes.create_string_buffer(out_size)
    attr = _TestAttr()
    attr.prog_fd = int(getattr(fd, "fd", fd))
    attr.data_size_in = len(data)
    attr.data_size_out = out_size
    attr.data_in = ctypes.addressof(inbuf)
    attr.data_out = ctypes.addressof(outbuf)
    attr.repeat = max(1, int(repeat))
    _bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return attr.retval, outbuf.raw[: attr.data_size_out], attr.duration


# include/uapi/linux/bpf.h: BPF_PROG_TEST_RUN flags
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


class _XdpMd(ctypes.Structure):
    """struct xdp_md (include/uapi/linux/bpf.h): the context a test run may pass in."""

    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


def prog_run_live(
    fd: int | object,
    data: bytes,
    ingress_ifindex: int,
    repeat: int,
    batch_size: int = 64,
    rx_queue: int = 0,
) -> int:
    """Run an XDP program `repeat` times in live-frame mode (BPF_F_TEST_XDP_LIVE_FRAMES,
    Linux 5.18+; net/bpf/test_run.c bpf_test_run_xdp_live()) as if each frame had arrived on
    `ingress_ifindex` (resolved in the calling thread's network namespace), RX queue
    `rx_queue`. Verdicts are carried out for real: XDP_TX sends out of that device,
    XDP_REDIRECT redirects, XDP_PASS builds an skb. Frames come from a page pool the kernel
    recycles, initialised with `data` only when a page is first used. Processing happens on the
    calling CPU, `batch_size` frames at a time (max 256). Returns the mean ns per frame.
    Some kernel builds refuse the flag with EPERM even to root while plain runs work
    (BpfTestRunError with that errno; bench/e2e.py live_frames_refusal() probes for it)."""
    inbuf = ctypes.create_string_buffer(bytes(data), len(data))
    ctx = _XdpMd(data=0, data_end=len(data), ingress_ifindex=ingress_ifindex,
                 rx_queue_index=rx_queue)  # fmt: skip
    attr = _TestAttr()
    attr.prog_fd = int(getattr(fd, "fd", fd))
    attr.data_size_in = len(data)
    attr.data_in = ctypes.addressof(inbuf)
    attr.repeat = max(1, int(repeat))
    attr.ctx_size_in = ctypes.sizeof(ctx)
    attr.ctx_in = ctypes.addressof(ctx)
    attr.flags = BPF_F_TEST_XDP_LIVE_FRAMES
    attr.batch_size = batch_size
    _bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN (live frames)")
    return attr.duration
