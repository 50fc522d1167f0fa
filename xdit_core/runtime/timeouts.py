"""How long the runtime waits before it calls a rank dead, a cancel ignored or a cluster unreachable.

Each has a default fit for real runs and an environment variable (read at call time, so tests can
shorten them): a frozen rank must not hold ComfyUI's queue for the 10-minute collective timeout.
"""
from __future__ import annotations

import math
import os

from xdit_core.errors import XDiTConfigError

_DEFAULTS = {
    # A rank that has not answered (heartbeat or ping) for this long is dead: its process is frozen.
    "XDIT_LIVENESS_TIMEOUT_S": 30.0,
    # After a cancel, ranks get this long to stop at a step boundary before they are killed.
    "XDIT_CANCEL_GRACE_S": 15.0,
    # Connecting to a cluster address (TCP reachability, then Ray's own handshake).
    "XDIT_CONNECT_TIMEOUT_S": 15.0,
    # A spawned rank must start (interpreter, imports) and send its first heartbeat within this.
    "XDIT_STARTUP_TIMEOUT_S": 300.0,
}


def seconds(name: str) -> float:
    """The timeout `name` (one of the XDIT_*_S variables) in seconds: the environment's, else the default."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return _DEFAULTS[name]
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise XDiTConfigError(f"{name}={raw!r} must be a positive number of seconds "
                              f"(default {_DEFAULTS[name]:g})")
    return value


def liveness_timeout_s() -> float:
    return seconds("XDIT_LIVENESS_TIMEOUT_S")


def cancel_grace_s() -> float:
    return seconds("XDIT_CANCEL_GRACE_S")


def connect_timeout_s() -> float:
    return seconds("XDIT_CONNECT_TIMEOUT_S")


def startup_timeout_s() -> float:
    return seconds("XDIT_STARTUP_TIMEOUT_S")
