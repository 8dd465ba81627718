"""Readiness probes: can this process's pool serve a request right now?

`check` answers for one alias by doing what a request would do: a checkout (with
the pool's health check, and a connect if no idle connection is there), bounded
by a short deadline, then giving the connection back. A probe therefore never
opens more connections than ``MAX_CONNS`` allows, and it waits in the pool's
queue like a request, first come first served.

Single flight: at most one probe per alias is in flight in a process. Probes
that arrive meanwhile wait for its answer instead of queueing checkouts of their
own, so a burst of probes (many load balancers, a probe timeout shorter than the
deadline) puts at most one checkout in the queue behind real requests.

The answer is ``None`` (ready) or a reason:

* ``"pool closed"``: the process is shutting down its pools;
* ``"pool exhausted: ..."``: every connection stayed in use past the deadline;
* ``"database unavailable: ..."``: the connect failed or did not finish in time.
"""

from __future__ import annotations

import logging

import gevent
from gevent.event import AsyncResult

from . import registry
from .errors import PoolClosed, PoolTimeout

__all__ = ["DEFAULT_TIMEOUT", "check"]

logger = logging.getLogger(__name__)

#: Seconds a probe's checkout may take before the answer is "not ready".
DEFAULT_TIMEOUT = 1.0

# alias -> the answer of the probe in flight. Process-global: the probes of all
# greenlets of the process must share it (that is the point).
_in_flight: dict[str, AsyncResult] = {}


class _Deadline(Exception):
    """The probe's checkout did not finish within its deadline."""


def check(alias: str = "default", timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """None if ``alias``'s pool can serve within ``timeout`` seconds, else why not.

    Joins the probe in flight for ``alias`` if there is one. Returns within about
    ``timeout`` seconds whatever the server does.
    """
    answer = _in_flight.get(alias)
    if answer is None:
        answer = _in_flight[alias] = AsyncResult()
        gevent.spawn(_probe, alias, timeout, answer)
    try:
        # The probe has its own deadline; this one only guards against a bug there.
        return answer.get(timeout=timeout + 1.0)
    except gevent.Timeout:
        return f"probe did not answer within {timeout + 1.0:.1f}s"


def _probe(alias: str, timeout: float, answer: AsyncResult) -> None:
    reason: str | None = "probe failed"
    try:
        reason = _checkout(alias, timeout)
    except Exception as exc:
        reason = f"probe failed: {exc}"
    finally:
        if _in_flight.get(alias) is answer:
            del _in_flight[alias]
        answer.set(reason)
    if reason is not None:
        logger.warning("readiness of %r: %s", alias, reason)


def _checkout(alias: str, timeout: float) -> str | None:
    from django.db import connections
    from django.db.utils import Error as DatabaseError

    pool = registry.pool_of(alias)
    if pool is not None and pool.closed:
        return "pool closed"
    # This greenlet's own wrapper (Django keeps one per greenlet): the checkout
    # below is the probe's, given back before the greenlet ends.
    wrapper = connections[alias]
    try:
        with gevent.Timeout(timeout, _Deadline):
            wrapper.ensure_connection()
    except _Deadline:
        pool = registry.pool_of(alias)
        if pool is not None and pool.get_stats()["pool_size"] >= pool.max_size:
            return f"pool exhausted: no connection free within {timeout:.1f}s"
        return f"database unavailable: no connection within {timeout:.1f}s"
    except PoolClosed:
        return "pool closed"
    except PoolTimeout:
        return f"pool exhausted: no connection free within {timeout:.1f}s"
    except DatabaseError as exc:
        return f"database unavailable: {str(exc).strip()}"
    finally:
        wrapper.close()
    return None
