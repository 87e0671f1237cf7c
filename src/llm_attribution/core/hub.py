"""Is the model hub reachable? Asked once, quickly, before any download.

``transformers`` and ``datasets`` retry an unreachable hub for half a minute or more before failing; one
short HTTP request (through the same client and proxies they use, without retries) lets an offline
machine fail in seconds with advice instead.
"""

from __future__ import annotations

import os

HUB_PROBE_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint answers an HTTP request (any status) within about ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # DNS, refused, timed out, proxy or TLS failure: all mean no answer
        return False
    return True
