"""A stand-in for a call to another service (HTTP, Redis, S3), shared by views and tasks."""

import time

# Callers of this process inside `call_another_service` now, and at most so far.
_inside = 0
_inside_peak = 0


def call_another_service(seconds: float) -> int:
    """Wait ``seconds`` (``time.sleep``, which gevent makes cooperative).

    Returns how many callers of this process were inside the wait at once so far:
    with ``POOL_MODE=transaction`` no connection is held during it, so more than
    ``MAX_CONNS`` can be.
    """
    global _inside, _inside_peak
    _inside += 1
    _inside_peak = max(_inside_peak, _inside)
    try:
        time.sleep(seconds)
    finally:
        _inside -= 1
    return _inside_peak
