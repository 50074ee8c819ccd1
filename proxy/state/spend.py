"""Budgets and client caps shared in Redis: the reservation rule of gateway/spend.py, atomic
across every process (scripts.RESERVE), and the spend per window every process records.

- A paid attempt reserves its worst case (awaited, one round trip) before it is sent: a hold
  `{ns}:holds` field `<process>:<n>` = `amount|client`, with its expiry in `{ns}:holds:expiry`.
  A hold not released within `state.hold_seconds` (its process died) is dropped by the next reserve.
- Settling (shrink to the real cost), recording the ledger's real cost and releasing go through
  one queue per process, in that order, off the request path; so a cost is counted before its
  hold goes (never neither), and each priced record is added exactly once, by the process whose
  ledger priced it.
- Spend counters (`{ns}:spend:<window>:<start>`, `{ns}:client_spend:<day>`) are seeded from
  the ledger (SET NX) when missing (a new window, or a Redis that restarted empty) and expire a
  day after their window ends.
- Redis lost: the local BudgetTracker and ClientLimits take over at this process's share (1/N of
  what was left); what is recorded meanwhile is pushed on rejoin, unless Redis came back empty
  (then the ledger, which has it, seeds the counters). N errs high, never low: the largest of
  `state.processes` (which `--workers N` raises to N) and the most processes any heartbeat of
  this one counted since it started. The last heartbeat alone undercounts: a process that started
  before the others registered (the first replica, worker 0) saw itself alone, and would take
  the whole budget while the others took their shares too; one that dropped out of the
  heartbeat may only be cut off from Redis, spending its own share.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Protocol

from proxy.config import ClientKey
from proxy.gateway.client_keys import ClientLimits, ClientSpendSource
from proxy.ledger.budget import WINDOWS, BudgetTracker, SpendSource, next_window_start, window_start
from proxy.ledger.pricing import from_nano, to_nano
from proxy.ledger.store import StoreError
from proxy.state import scripts
from proxy.state.link import Down, RedisLink

log = logging.getLogger("proxy.state")

_DAY = 86400


class Ledgerish(SpendSource, ClientSpendSource, Protocol):
    """Where spend is seeded from (the ledger)."""


@dataclass(slots=True)
class _Op:
    hold: str | None = None  # a hold to set to `amount` (0: drop it)
    amount: int = 0
    cost: int = 0  # or a priced record to add
    client: str = ""
    at: float = 0.0


_STOP = _Op(hold="")  # the end of the queue (close)


@dataclass
class SharedSpend:
    link: RedisLink
    budget: BudgetTracker
    limits: ClientLimits
    source: Ledgerish | None = None
    caps: dict[str, Decimal] = field(default_factory=dict)  # client -> daily_usd, as last seen
    # Last heard from Redis (for the degraded share): spend per window, every hold, per client
    known: dict[str, Decimal] = field(default_factory=dict)
    known_held: Decimal = Decimal(0)
    known_clients: dict[str, Decimal] = field(default_factory=dict)
    unsynced: list[_Op] = field(default_factory=list)  # recorded while Redis was lost
    most_peers: int = 1  # the most processes a heartbeat has shown since start
    ids: Iterator[int] = field(default_factory=itertools.count)
    _queue: asyncio.Queue[_Op] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None

    def _hold_keys(self) -> list[str]:
        return [self.link.key("holds"), self.link.key("holds", "expiry")]

    def __post_init__(self) -> None:
        self._local_hold = f"{self.link.proc_id}:local"
        self._reserve = self.link.script(scripts.RESERVE)
        self._set_holds = self.link.script(scripts.SET_HOLDS)
        self._record = self.link.script(scripts.RECORD)
        self._seed_clients = self.link.script(scripts.SEED_CLIENTS)
        self.link.on_down.append(self._adopt_share)
        self.link.on_rejoin.append(self._rejoin)
        self.link.on_tick.append(self._refresh)

    def start(self) -> None:
        self._task = asyncio.create_task(self._drain(), name="proxy-state-spend")

    async def close(self) -> None:
        """Send what is queued (for up to 2 s), then stop. A marker ends the queue rather than a
        cancel alone: a cancel that lands while redis-py handles a timeout can be swallowed."""
        task = self._task
        if task is None:
            return
        self._queue.put_nowait(_STOP)
        done, _ = await asyncio.wait([task], timeout=2.0)
        if not done:
            task.cancel()
            await asyncio.wait([task], timeout=1.0)

    # ------------------------------------------------------------------ the request path

    async def reserve(self, key: ClientKey | None, amount: Decimal, at: float) -> tuple[str, str | None]:
        """("ok", hold id) | ("budget" | "client", None): refused | ("down", None): decide locally."""
        client, cap = "", -1
        if key is not None and key.daily_usd is not None:
            client, cap = key.name, to_nano(key.daily_usd)
            self.caps[key.name] = key.daily_usd
        limits = self.budget.limits()
        hold = f"{self.link.proc_id}:{next(self.ids)}"
        keys = [*self._spend_keys(at), *self._hold_keys()]
        args = [hold, to_nano(amount), client, cap]
        args += [-1 if limits[w] is None else to_nano(limits[w]) for w in WINDOWS]  # type: ignore[arg-type]
        args.append(int(self.link.spec.hold_seconds * 1000))
        try:
            reply = await self.link.run(self._reserve, keys, args)
            if reply[0] == -1:
                await self._seed(at)
                reply = await self.link.run(self._reserve, keys, args)
        except (Down, StoreError):  # StoreError: no seed from the ledger: this process decides
            return "down", None
        ok, spent, held, cspent, cheld = reply[0], reply[1:4], reply[4], reply[5], reply[6]
        self.known = {w: from_nano(int(s)) for w, s in zip(WINDOWS, spent, strict=True)}
        self.known_held = from_nano(int(held))
        self.budget.mirror(self.known, at)
        if client:
            self.known_clients[client] = from_nano(int(cspent) + int(cheld))
            self.limits.mirror(client, from_nano(int(cspent)), at)
        if ok == 1:
            return "ok", hold
        return ("budget" if ok == 0 else "client"), None

    def settle(self, hold: str, amount: Decimal) -> None:
        self._queue.put_nowait(_Op(hold=hold, amount=to_nano(amount)))

    def release(self, hold: str) -> None:
        self._queue.put_nowait(_Op(hold=hold))

    def record(self, cost: Decimal, client: str | None, at: float) -> None:
        """A cost the ledger priced (its cost listener, at submit time): added once, by this process."""
        op = _Op(cost=to_nano(cost), client=client or "", at=at)
        if self.link.up:
            self._queue.put_nowait(op)
        else:
            self._local(op)

    # ------------------------------------------------------------------ in the background

    async def _drain(self) -> None:
        while True:
            op = await self._queue.get()
            if op is _STOP:
                return
            if not self.link.up:
                if op.hold is None:
                    self._local(op)
                continue  # a hold: it expires in Redis, and the local state never had it
            try:
                if op.hold is not None:
                    await self.link.run(self._set_holds, self._hold_keys(), [op.hold, op.amount])
                else:
                    await self._push(op)
            except (Down, StoreError) as e:  # StoreError: the ledger could not seed a counter
                if op.hold is None:
                    self._local(op)
                if isinstance(e, StoreError):
                    log.error("state: cannot seed the shared spend from the ledger: %s; counted locally", e)

    async def _push(self, op: _Op) -> None:
        keys = self._spend_keys(op.at)
        reply = await self.link.run(self._record, keys, [op.cost, op.client])
        if isinstance(reply, list) and reply[0] == -1:
            await self._seed(op.at)
            await self.link.run(self._record, keys, [op.cost, op.client])

    def _local(self, op: _Op) -> None:
        cost = from_nano(op.cost)
        self.budget.record(cost, op.at)
        self.limits.record(op.client or None, cost, op.at)
        self.unsynced.append(op)

    def _spend_keys(self, at: float) -> list[str]:
        keys = [self.link.key("spend", w, window_start(w, at).isoformat()) for w in WINDOWS]
        return [*keys, self.link.key("client_spend", window_start("daily", at).isoformat())]

    async def _seed(self, at: float) -> None:
        """Missing counters from the ledger, only if still missing (another process may be quicker)."""
        for w, key in zip(WINDOWS, self._spend_keys(at), strict=False):
            start = window_start(w, at)
            spent = await self.source.spend_since(start.isoformat()) if self.source is not None else Decimal(0)
            await self._set_nx(key, to_nano(spent), _midnight(next_window_start(w, start)) + _DAY)
        day = window_start("daily", at)
        clients = await self.source.client_spend_since(day.isoformat()) if self.source is not None else {}
        args: list[object] = [int(_midnight(day + timedelta(days=1)) + _DAY - at)]
        for client, spent in clients.items():
            args += [client, to_nano(spent)]
        await self.link.run(self._seed_clients, [self._spend_keys(at)[3]], args)

    async def _set_nx(self, key: str, value: int, expires_at: int) -> None:
        await self.link.call(lambda: self.link.client.set(key, value, nx=True, exat=expires_at))

    def processes(self) -> int:
        """N of the degraded share: the most processes known to share the state (see the top)."""
        self.most_peers = max(self.most_peers, self.link.peers)
        return max(self.most_peers, self.link.spec.processes)

    def _adopt_share(self) -> None:
        n = self.processes()
        log.warning(
            "state: while Redis is lost this process takes 1/%d of what is left of each budget and client cap, "
            "and of each client rate (the most processes known: %d counted by its heartbeat, state.processes %d)",
            n,
            self.most_peers,
            self.link.spec.processes,
        )
        share = 1.0 / n
        now = datetime.now(UTC).timestamp()
        # Nothing heard yet: the spend the ledger had at start (or the last mirror), holds unknown.
        self.budget.adopt_share(self.known or self.budget.spent(), self.known_held, share, now)
        self.limits.adopt_share(self.known_clients, self.caps, share, now)

    def local_released(self) -> None:
        """A hold made while Redis was lost ended: shrink this process's aggregate hold in Redis."""
        if self.link.up:
            self._queue.put_nowait(_Op(hold=self._local_hold, amount=to_nano(self.budget.reserved)))

    async def _rejoin(self) -> None:
        try:
            await self._resync()
        except StoreError as e:
            raise Down(f"cannot seed the shared spend from the ledger: {e}") from e

    async def _resync(self) -> None:
        """Before the link is up again: what was recorded while it was down reaches Redis once, and
        the holds made meanwhile (still in flight) are held there too, as one aggregate hold."""
        now = datetime.now(UTC).timestamp()
        if self.budget.reserved > 0:
            hold = [self._local_hold, to_nano(self.budget.reserved), "", -1, -1, -1, -1]
            keys = [*self._spend_keys(now), *self._hold_keys()]
            await self._seed(now)
            await self.link.run(self._reserve, keys, [*hold, int(self.link.spec.hold_seconds * 1000)])
        if self.unsynced:
            daily = self._spend_keys(now)[0]
            kept = await self.link.call(lambda: self.link.client.exists(daily))
            if kept:  # Redis kept its counters: add ours; else the ledger seeds them, ours included
                while self.unsynced:
                    await self._push(self.unsynced[0])
                    self.unsynced.pop(0)
            self.unsynced.clear()
        self.limits.share = 1.0
        self.known, self.known_held, self.known_clients = {}, Decimal(0), {}
        await self._refresh()

    async def _refresh(self) -> None:
        """The heartbeat's mirror of the shared spend (routing, X-Proxy-Budget-Remaining, metrics)."""
        self.most_peers = max(self.most_peers, self.link.peers)  # on_tick: right after each heartbeat
        now = datetime.now(UTC).timestamp()
        keys = self._spend_keys(now)

        async def read() -> tuple[list[bytes | None], dict[bytes, bytes]]:
            async with self.link.client.pipeline(transaction=False) as p:
                p.mget(keys[:3])
                p.hgetall(keys[3])
                spent, clients = await p.execute()
            return spent, clients

        spent, clients = await self.link.call(read)
        if all(s is not None for s in spent):
            self.known = {w: from_nano(int(s)) for w, s in zip(WINDOWS, spent, strict=True)}
            self.budget.mirror(self.known, now)
        for name, value in clients.items():
            if name != b"_seeded":
                self.limits.mirror(name.decode(), from_nano(int(value)), now)


def _midnight(day: date) -> int:
    return int(datetime.combine(day, datetime.min.time(), UTC).timestamp())
