"""Each tier's breaker shared in Redis: the rules of gateway/breaker.py (consecutive failures,
open-until, one half-open probe, stale tickets) run as one script (scripts.BREAKER) on
`{ns}:breaker:<tier>` (a hash, kept `_TTL` after its last change) and the probe's lease
`{ns}:breaker:<tier>:probe` (SET NX PX: one probe across every process, freed by its result, or
when the lease ends if its process died).

The process's own BreakerBoard is a mirror of Redis (routing, Retry-After, /readyz and metrics
read it). Every change the script makes is published on `{ns}:breaker-events`, which each
process follows, so a closed breaker costs no round trip: while the subscription is live and
the mirror of a tier has been synced once since (by a script reply), an attempt on a closed
breaker takes its ticket from the mirror, and a success that changes nothing (no failures
counted) is not sent. Failures, probes and anything on an open breaker go to Redis. The cost of
that: a breaker opened on one process is seen closed by another for as long as the event takes
to arrive (well under a millisecond on one network); attempts it lets through meanwhile hold a
ticket of the closed period, so their results are stale and ignored, as for calls that were in
flight when it opened. A lost subscription is a lost Redis (the link falls back, then rejoins
and subscribes again before trusting the mirror).

The mirror is also the fallback while Redis is lost: a ticket Redis issued carries Redis's epoch,
which the mirror shares, so its result still counts locally, by the same rules. On rejoin Redis's
state wins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio.client import PubSub

from proxy.gateway.breaker import Breaker, BreakerBoard, Ticket
from proxy.records import Escalation
from proxy.state import scripts
from proxy.state.link import FAILURES, Down, RedisLink

log = logging.getLogger("proxy.state")

_TTL_MS = 24 * 3600 * 1000  # a breaker untouched for a day is forgotten (closed, no failures)


class SharedBreakers:
    def __init__(self, link: RedisLink, board: BreakerBoard, probe_lease_seconds: float) -> None:
        self.link = link
        self.board = board
        self.probe_lease_ms = int(probe_lease_seconds * 1000)
        self.channel = link.key("breaker-events")
        self._script = link.script(scripts.BREAKER)
        self._background: set[asyncio.Task[None]] = set()
        self._synced: set[str] = set()  # tiers whose mirror follows Redis (through the events)
        self._versions: dict[str, int] = {}  # the last change applied to each tier's mirror
        self._events: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        link.on_down.append(self._unfollow)
        link.on_rejoin.append(self._follow)

    # ------------------------------------------------------------------ the failover loop's calls

    async def acquire(self, tier_id: str, now: float, *, last_resort: bool) -> Ticket | None:
        b = self.board.get(tier_id)
        if not self.link.up:
            return b.acquire(now, last_resort=last_resort)
        if b.opened_at is None and tier_id in self._synced:
            return Ticket(b.epoch, shared=True)  # closed: nothing to ask (the events say when it opens)
        try:
            reply = await self._op(tier_id, "acquire", Ticket(0), last_resort=last_resort)
        except Down:
            return b.acquire(now, last_resort=last_resort)
        if reply[0] == 0:
            return None
        return Ticket(int(reply[1]), probe=reply[0] == 2, shared=True)

    async def on_success(self, tier_id: str, ticket: Ticket) -> None:
        b = self.board.get(tier_id)
        if self._unchanged(tier_id, ticket) and b.failures == 0:
            return  # a success of a closed breaker with no failures to reset: nothing to tell
        if not await self._shared(tier_id, "success", ticket):
            b.on_success(ticket)

    async def on_failure(self, tier_id: str, ticket: Ticket, now: float, *, bad_answer: bool = False) -> None:
        if not await self._shared(tier_id, "failure", ticket, bad_answer=bad_answer):
            self.board.get(tier_id).on_failure(ticket, now, bad_answer=bad_answer)

    async def on_neutral(self, tier_id: str, ticket: Ticket) -> None:
        if self._unchanged(tier_id, ticket):
            return  # only a probe's slot needs freeing
        if not await self._shared(tier_id, "neutral", ticket):
            self.board.get(tier_id).on_neutral(ticket)

    async def trip(self, tier_id: str, ticket: Ticket, now: float) -> None:
        if not await self._shared(tier_id, "trip", ticket):
            self.board.get(tier_id).trip(ticket, now)

    def neutral_soon(self, tier_id: str, ticket: Ticket) -> None:
        """From a cancelled attempt, which cannot wait: a probe's lease is freed in the background."""
        if not (ticket.shared and ticket.probe and self.link.up):
            self.board.get(tier_id).on_neutral(ticket)
            return
        self._spawn(self.on_neutral(tier_id, ticket))

    async def close(self) -> None:
        self._unfollow()
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)

    # ------------------------------------------------------------------ Redis

    def _unchanged(self, tier_id: str, ticket: Ticket) -> bool:
        """True when Redis would change nothing for this (non-probe) result: the ticket is of the
        closed period the mirror, synced and live, shows."""
        b = self.board.get(tier_id)
        return (
            ticket.shared
            and not ticket.probe
            and self.link.up
            and tier_id in self._synced
            and b.opened_at is None
            and ticket.epoch == b.epoch
        )

    async def _shared(self, tier_id: str, op: str, ticket: Ticket, *, bad_answer: bool = False) -> bool:
        """True when Redis took the result (a ticket it issued, while it answers)."""
        if not (ticket.shared and self.link.up):
            return False
        try:
            await self._op(tier_id, op, ticket, bad_answer=bad_answer)
        except Down:
            return False
        return True

    async def _op(
        self, tier_id: str, op: str, ticket: Ticket, *, last_resort: bool = False, bad_answer: bool = False
    ) -> Any:
        bd = self.board
        keys = [self.link.key("breaker", tier_id), self.link.key("breaker", tier_id, "probe"), self.channel]
        args = [
            op,
            ticket.epoch,
            int(ticket.probe),
            int(bad_answer),
            int(last_resort),
            bd.threshold,
            int(bd.cooldown * 1000),
            bd.successes_to_close,
            self.probe_lease_ms,
            _TTL_MS,
            tier_id,
        ]
        events = self._events
        reply = await self.link.run(self._script, keys, args)
        b = self.board.get(tier_id)
        self._mirror(tier_id, b, int(reply[6]), int(reply[1]), int(reply[2]), reply[3], int(reply[5]))
        b.probing = bool(reply[4])
        if events is not None and events is self._events:
            self._synced.add(tier_id)  # the subscription was live before this reply: events follow it
        return reply

    def _mirror(self, tier_id: str, b: Breaker, ver: int, epoch: int, left: int, why: Any, failures: int) -> None:
        """Redis's state of one breaker, unless the mirror already has a later change (a reply and
        an event of the same change come by different connections, in either order)."""
        if ver < self._versions.get(tier_id, 0):
            return
        self._versions[tier_id] = ver
        b.epoch, b.failures = epoch, failures
        if left < 0:
            b.opened_at, b.opened_for = None, None
        else:
            b.opened_at = time.monotonic() + left / 1000.0 - b.cooldown
            text = why.decode() if isinstance(why, bytes) else str(why)
            b.opened_for = Escalation(text) if text else Escalation.FAILURES

    # ------------------------------------------------------------------ the events

    async def _follow(self) -> None:
        """(Re)joining: subscribe, and wait for Redis to confirm it, before any mirror is trusted."""
        self._unfollow()
        events = self.link.client.pubsub()
        try:
            async with asyncio.timeout(self.link.timeout):
                await events.subscribe(self.channel)
                while (msg := await events.get_message(timeout=self.link.timeout)) is None or msg[
                    "type"
                ] != "subscribe":
                    pass
        except FAILURES as e:
            await events.aclose()  # type: ignore[no-untyped-call]
            raise Down(f"cannot follow the breakers' events: {e!r}") from e
        self._events = events
        self._reader = asyncio.get_running_loop().create_task(self._read(events), name="proxy-state-breaker-events")

    async def _read(self, events: PubSub) -> None:
        try:
            async for msg in events.listen():
                if msg["type"] == "message":
                    self._apply(msg["data"])
        except FAILURES as e:
            if self._events is events:
                self.link.lost(e)  # no events, no mirror to trust: as if Redis were lost

    def _apply(self, data: bytes) -> None:
        try:
            tier_id, ver, epoch, left, why, failures = data.decode().split("|")
            self._mirror(tier_id, self.board.get(tier_id), int(ver), int(epoch), int(left), why, int(failures))
        except ValueError:
            log.warning("state: ignoring a malformed breaker event %r", data[:200])

    def _unfollow(self) -> None:
        """Redis lost (or closing): no mirror is trusted until subscribed again, and a probe another
        process holds is no longer this one's business."""
        self._synced.clear()
        for b in self.board.breakers.values():
            b.probing = False
        events, reader, self._events, self._reader = self._events, self._reader, None, None
        if reader is not None:
            reader.cancel()
        if events is not None:
            self._spawn(events.aclose())  # type: ignore[no-untyped-call]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
