"""Several equivalent servers behind one pool: which one gets the next connection.

Semantics, which the Django glue and the docs rely on:

* **Equivalent peers.** Every peer serves the same data (pgbouncers in front of
  one database, the nodes of an HAProxy/Patroni pair, replicas for a read-only
  alias). A connection to any of them is as good as one to another.
* **Choice.** A new connection goes to the healthy peer with the fewest
  connections (open or being opened by this pool); ties are broken at random. So
  connections are spread evenly over the peers, and a peer that comes back takes
  the new connections until it has caught up.
* **Down for a while.** A peer whose connect fails (a driver connect error) is
  marked down (WARNING) and skipped for ``check_interval`` seconds; the same
  checkout moves on to the next peer at once, so no request fails while another
  peer is up.
* **Retry.** A down peer becomes due again after ``check_interval``; the next new
  connection tries it first (one checkout at a time: a peer is never probed by two
  checkouts at once) and marks it up on success, or moves on to a healthy peer
  and keeps it down for another ``check_interval``. At most one connect per peer
  and interval is spent on a dead peer, whatever the traffic.
* **Read-only.** When the pool finds that a connection's server has turned
  read-only while a writable server is required (see `read_only`), its peer is
  marked down for ``check_interval`` as if a connect had failed, and new
  connections go to the other peers.
* **All down.** When no peer is up or due, `AllPeersDown` is raised at once,
  without a connect and without waiting for a free slot: its message names each
  peer, since when it is down and its last error.

Like `pool`, this module knows nothing of Django or of a driver: peers are names,
connections are opened by a callable, and the driver's connect errors are given.
Its Django glue (reading the peers' ``DATABASES`` entries) is ``backends/peers_glue.py``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any, TypeVar

from . import forking
from .errors import AllPeersDown

__all__ = ["AllPeersDown", "Peer", "PeerSet", "PEER_STATS_SUFFIXES"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Per-peer stats keys are "peer.<name>.<suffix>".
PEER_UP = "up"
PEER_CONNECTIONS = "connections"
PEER_CONNECTS = "connects"
PEER_CONNECTS_FAILED = "connects_failed"
PEER_STATS_SUFFIXES = (PEER_UP, PEER_CONNECTIONS, PEER_CONNECTS, PEER_CONNECTS_FAILED)


class Peer:
    """One server of a `PeerSet`, and what the pool knows of it."""

    __slots__ = (
        "name",
        "up",
        "down_since",
        "down_since_wall",
        "retry_at",
        "last_error",
        "connects",
        "connects_failed",
        "connections",
        "opening",
        "probing",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        #: When the current outage began (monotonic, and wall clock for messages).
        self.down_since: float | None = None
        self.down_since_wall: float | None = None
        #: When a down peer may be tried again (monotonic).
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.connects = 0
        self.connects_failed = 0
        #: Connections of the pool to this peer that are open now.
        self.connections = 0
        #: Connects to this peer in progress.
        self.opening = 0
        #: True while a checkout is retrying this (down) peer.
        self.probing = False

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<Peer {self.name!r} {state} connections={self.connections}>"


class PeerSet:
    """The peers of one pool; `open_connection` picks one and tracks the outcome."""

    def __init__(
        self,
        name: str,
        peer_names: Iterable[str],
        *,
        check_interval: float,
        connect_errors: tuple[type[BaseException], ...],
    ) -> None:
        self.name = name
        self.peers = [Peer(peer_name) for peer_name in dict.fromkeys(peer_names)]
        if not self.peers:
            raise ValueError("a PeerSet needs at least one peer")
        self.check_interval = check_interval
        self.connect_errors = connect_errors
        # Open connections by id(), with the object itself so the id cannot be
        # reused while it is tracked.
        self._peer_of: dict[int, tuple[Any, Peer]] = {}
        # Forks since creation (see forget_after_fork): a connect that began before
        # the last one is the parent's, and counts nowhere in the child.
        self._forks = 0
        forking.track_peer_set(self)

    # -- opening ----------------------------------------------------------------

    def open_connection(self, open_on_peer: Callable[[str, bool], T], reconnect: bool) -> T:
        """Open a connection on a chosen peer with ``open_on_peer(peer_name, reconnect)``.

        A peer whose connect raises one of ``connect_errors`` is marked down and
        the next peer is tried (with ``reconnect`` true). Any other exception
        propagates and leaves the peer's state alone. Raises `AllPeersDown` when no
        peer is left to try.
        """
        tried: list[Peer] = []
        forks = self._forks
        while True:
            # Critical section: choose and reserve a peer; no yield in between.
            peer = self._choose(tried)
            if peer is None:
                error = AllPeersDown(self._all_down_message())
                error.attempted = bool(tried)
                raise error
            tried.append(peer)
            peer.opening += 1
            probe = not peer.up
            if probe:
                peer.probing = True
            try:
                raw = open_on_peer(peer.name, reconnect or len(tried) > 1)
            except self.connect_errors as exc:
                if self._forks != forks:
                    raise  # the parent's connect, ended in a forked child: its own affair
                self._mark_down(peer, exc)
                continue
            finally:
                if self._forks == forks:
                    peer.opening -= 1
                    if probe:
                        peer.probing = False
            if self._forks != forks:
                # Begun in the parent, resumed in a forked child (whose counts started
                # from zero): the pool leaves the connection to the parent.
                return raw
            self._opened(peer, raw)
            return raw

    def _choose(self, tried: list[Peer]) -> Peer | None:
        now = monotonic()
        # A down peer that is due is tried first: otherwise it would never be
        # retried while the others are healthy.
        due = [
            p
            for p in self.peers
            if not p.up and not p.probing and now >= p.retry_at and p not in tried
        ]
        if due:
            return random.choice(due)
        healthy = [p for p in self.peers if p.up and p not in tried]
        if not healthy:
            return None
        return min(healthy, key=lambda p: (p.connections + p.opening, random.random()))

    def _opened(self, peer: Peer, raw: Any) -> None:
        peer.connects += 1
        peer.connections += 1
        self._peer_of[id(raw)] = (raw, peer)
        if not peer.up:
            logger.info(
                "pool %r: peer %r is up again after %.1fs",
                self.name,
                peer.name,
                monotonic() - (peer.down_since or monotonic()),
            )
            peer.up = True
            peer.down_since = peer.down_since_wall = None

    def _mark_down(self, peer: Peer, exc: BaseException) -> None:
        now = monotonic()
        peer.connects_failed += 1
        peer.last_error = " ".join(str(exc).split()) or type(exc).__name__
        peer.retry_at = now + self.check_interval
        if peer.up:
            peer.up = False
            peer.down_since = now
            peer.down_since_wall = time.time()
            logger.warning(
                "pool %r: peer %r marked down for %.1fs: %s",
                self.name,
                peer.name,
                self.check_interval,
                peer.last_error,
            )
        else:
            logger.warning(
                "pool %r: peer %r still down, next retry in %.1fs: %s",
                self.name,
                peer.name,
                self.check_interval,
                peer.last_error,
            )

    def _all_down_message(self) -> str:
        now = monotonic()
        parts = []
        # Every peer is down here: a tried peer either connected (and was
        # returned) or failed with a connect error and was marked down.
        for peer in self.peers:
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(peer.down_since_wall or 0))
            ago = now - (peer.down_since or now)
            if peer.probing:
                retry = "being retried by another checkout"
            else:
                retry = f"next retry in {max(peer.retry_at - now, 0.0):.1f}s"
            parts.append(
                f"{peer.name!r} down since {since} ({ago:.1f}s ago, {retry}), "
                f"last error: {peer.last_error}"
            )
        return f"pool {self.name!r}: every peer is down: " + "; ".join(parts)

    def read_only(self, raw: Any) -> None:
        """``raw``'s server reported itself read-only: mark its peer down (no-op if unknown)."""
        entry = self._peer_of.get(id(raw))
        if entry is None:
            return
        peer = entry[1]
        if peer.up or monotonic() >= peer.retry_at:
            self._mark_down(peer, _ReadOnlyServer("the server turned read-only"))

    # -- bookkeeping ------------------------------------------------------------

    def closed(self, raw: Any) -> None:
        """Forget a connection that was closed (unknown or already forgotten: no-op).

        Given to the pool as its ``on_close``: the pool closes every connection it
        owns through it (discard, expiry, reset failure, pool close), so this is
        where the per-peer count of open connections goes down.
        """
        entry = self._peer_of.pop(id(raw), None)
        if entry is not None:
            entry[1].connections -= 1

    def forget_after_fork(self) -> None:
        """In a forked child (called by `forking`, after the pools): counts start from zero.

        The pools forgot the parent's connections without closing them, so their
        counts are dropped here; a connect the parent had in progress goes on in the
        child but counts nowhere there (`open_connection`), and a peer left "probing"
        would never be retried.
        """
        self._peer_of.clear()
        self._forks += 1
        for peer in self.peers:
            peer.opening = 0
            peer.probing = False
            peer.connections = 0

    def get_stats(self) -> dict[str, int]:
        """``peer.<name>.up`` (1 or 0), ``.connections``, ``.connects``, ``.connects_failed``."""
        stats: dict[str, int] = {}
        for peer in self.peers:
            prefix = f"peer.{peer.name}."
            stats[prefix + PEER_UP] = int(peer.up)
            stats[prefix + PEER_CONNECTIONS] = peer.connections
            stats[prefix + PEER_CONNECTS] = peer.connects
            stats[prefix + PEER_CONNECTS_FAILED] = peer.connects_failed
        return stats


class _ReadOnlyServer(Exception):
    """Why a peer was marked down when its server turned read-only (a message only)."""
