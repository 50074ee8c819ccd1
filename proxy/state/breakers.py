"""Each tier's breaker shared in Redis: the rules of gateway/breaker.py (consecutive failures,
open-until, one half-open probe, stale tickets) run as one script (scripts.BREAKER) on
`{ns}:breaker:<tier>` (a hash, kept `_TTL` after its last change) and the probe's lease
`{ns}:breaker:<tier>:probe` (SET NX PX: one probe across every process, freed by its result, or
when the lease ends if its process died).

The process's own BreakerBoard is a mirror of what Redis last answered (routing, Retry-After,
/readyz and metrics read it) and the fallback while Redis is lost: a ticket Redis issued carries
Redis's epoch, which the mirror shares, so its result still counts locally, by the same rules.
On rejoin Redis's state wins.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.gateway.breaker import Breaker, BreakerBoard, Ticket
from proxy.records import Escalation
from proxy.state import scripts
from proxy.state.link import Down, RedisLink

_TTL_MS = 24 * 3600 * 1000  # a breaker untouched for a day is forgotten (closed, no failures)


class SharedBreakers:
    def __init__(self, link: RedisLink, board: BreakerBoard, probe_lease_seconds: float) -> None:
        self.link = link
        self.board = board
        self.probe_lease_ms = int(probe_lease_seconds * 1000)
        self._script = link.script(scripts.BREAKER)
        self._background: set[asyncio.Task[None]] = set()
        link.on_down.append(self._free_probes)

    async def acquire(self, tier_id: str, now: float, *, last_resort: bool) -> Ticket | None:
        b = self.board.get(tier_id)
        if self.link.up:
            try:
                reply = await self._op(tier_id, "acquire", Ticket(0), last_resort=last_resort)
            except Down:
                return b.acquire(now, last_resort=last_resort)
            self._mirror(b, reply)
            if reply[0] == 0:
                return None
            return Ticket(int(reply[1]), probe=reply[0] == 2, shared=True)
        return b.acquire(now, last_resort=last_resort)

    async def on_success(self, tier_id: str, ticket: Ticket) -> None:
        if not await self._shared(tier_id, "success", ticket):
            self.board.get(tier_id).on_success(ticket)

    async def on_failure(self, tier_id: str, ticket: Ticket, now: float, *, bad_answer: bool = False) -> None:
        if not await self._shared(tier_id, "failure", ticket, bad_answer=bad_answer):
            self.board.get(tier_id).on_failure(ticket, now, bad_answer=bad_answer)

    async def on_neutral(self, tier_id: str, ticket: Ticket) -> None:
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
        task = asyncio.get_running_loop().create_task(self.on_neutral(tier_id, ticket))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shared(self, tier_id: str, op: str, ticket: Ticket, *, bad_answer: bool = False) -> bool:
        """True when Redis took the result (a ticket it issued, while it answers)."""
        if not (ticket.shared and self.link.up):
            return False
        try:
            reply = await self._op(tier_id, op, ticket, bad_answer=bad_answer)
        except Down:
            return False
        self._mirror(self.board.get(tier_id), reply)
        return True

    async def _op(
        self, tier_id: str, op: str, ticket: Ticket, *, last_resort: bool = False, bad_answer: bool = False
    ) -> Any:
        bd = self.board
        keys = [self.link.key("breaker", tier_id), self.link.key("breaker", tier_id, "probe")]
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
        ]
        return await self.link.run(self._script, keys, args)

    @staticmethod
    def _mirror(b: Breaker, reply: Any) -> None:
        b.epoch = int(reply[1])
        left = int(reply[2])
        if left < 0:
            b.opened_at, b.opened_for = None, None
        else:
            b.opened_at = time.monotonic() + left / 1000.0 - b.cooldown
            why = reply[3].decode() if isinstance(reply[3], bytes) else str(reply[3])
            b.opened_for = Escalation(why) if why else Escalation.FAILURES
        b.probing = bool(reply[4])

    def _free_probes(self) -> None:
        """Redis lost: a probe another process holds is no longer this one's business."""
        for b in self.board.breakers.values():
            b.probing = False
