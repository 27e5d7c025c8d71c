# SPDX-License-Identifier: GPL-2.0-only
"""Why a learned flow is not offloaded: the one list of reasons.

Each value is the label of xfrm_fastpath_validation_rejections_total and the word the log
prints; values never change (dashboards and alerts select on them). Validation
(controller/core/validate.py) refuses with the first group; the agent (controller/agent/)
with the second, when the proof held but the flow could not be put on the fastpath.
"""

from __future__ import annotations

import enum


class RejectReason(enum.StrEnum):
    # -- the kernel's state does not prove the flow (controller/core/validate.py) -------------
    MANGLED = "mangled"  # rewritten on its way through (NAT)
    FWD_POLICY_BLOCKS = "fwd_policy_blocks"
    OUT_POLICY_BLOCKS = "out_policy_blocks"
    NOT_PROTECTED = "not_protected"  # no policy with a template covers it
    BUNDLE = "bundle"  # more than one template (SA bundle)
    NO_SA = "no_sa"
    SA_UNSUPPORTED = "sa_unsupported"  # an SA the datapath cannot serve (Sa.fastpath_support)
    SA_NOT_OF_POLICY = "sa_not_of_policy"
    SA_NOT_INBOUND = "sa_not_inbound"
    SA_SELECTOR = "sa_selector"
    OUTER_MISMATCH = "outer_mismatch"  # the SA's addresses are not the wire's
    NO_ROUTE = "no_route"
    ROUTE_NOT_UNICAST = "route_not_unicast"
    ROUTE_MISMATCH = "route_mismatch"
    NO_NEIGHBOUR = "no_neighbour"
    NEIGHBOUR_UNUSABLE = "neighbour_unusable"
    NEIGHBOUR_MISMATCH = "neighbour_mismatch"
    # -- the agent could not (or must not) offload it (controller/agent/) --------------------
    NO_SPI = "no_spi"  # the sighting carries no SPI
    WRONG_INTERFACES = "wrong_interfaces"  # not between our LAN and WAN devices
    TABLE_FULL = "table_full"  # the flow table ([tables] flows)
    SA_TABLE_FULL = "sa_table_full"  # an SA map ([tables] sas)
    NETLINK_ERROR = "netlink_error"  # the kernel's state could not be read: fail closed
    INSTALL_FAILED = "install_failed"
    NO_IV_MASK = "no_iv_mask"  # no kernel-sent IV seen yet to learn the seqiv mask from
    SEQ_EXHAUSTED = "seq_exhausted"  # no room left in the sequence space
    KERNEL_RACED = "kernel_raced"  # the kernel sent past the datapath's start meanwhile
    # A first packet the learner had no room for (a full perf ring, or Learner.max_pending
    # events already waiting): shed, so a flood costs bounded memory; the flow stays on the
    # kernel path and is seen again after LEARN_REEMIT_NS (bpf/tp_learn.c).
    LEARN_SHED = "learn_shed"
