# SPDX-License-Identifier: GPL-2.0-only
"""xfrm-fastpath: an XDP fastpath for Linux IPsec (XFRM) forwarding, and its control plane."""

__version__ = "0.1.0"
