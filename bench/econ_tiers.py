"""The economics run's three simulated tiers, in a process of their own.

`python -m bench.econ_tiers --seed S llama:PORT:0.125 ollama:PORT:0.25 kimi:PORT:0.035` serves
one `proxy.sim` upstream per argument on 127.0.0.1:PORT, answering JSON plans
(`proxy.sim.answers.PLAN_SCHEMA`) of which that share is bad: half prose around the JSON, half
JSON cut at max_tokens with finish_reason "length", plain and streamed alike. Each tier's random
generator is seeded from S and its position, so a run's bad answers come from the same sequences.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from aiohttp import web

from proxy.sim import SimSettings, create_sim_app


@dataclass(frozen=True)
class TierSpec:
    name: str
    port: int
    bad_answer_rate: float

    @classmethod
    def parse(cls, text: str) -> TierSpec:
        name, port, rate = text.split(":")
        return cls(name, int(port), float(rate))

    def arg(self) -> str:
        return f"{self.name}:{self.port}:{self.bad_answer_rate}"


async def serve(tiers: list[TierSpec], seed: int) -> None:
    runners: list[web.AppRunner] = []
    try:
        for i, t in enumerate(tiers):
            settings = SimSettings(
                name=t.name,
                json_plans=True,
                bad_answer_rate=t.bad_answer_rate,
                seed=seed * 1000 + i,
                record_requests=False,
            )
            runner = web.AppRunner(create_sim_app(settings), access_log=None, handler_cancellation=True)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", t.port, backlog=1024).start()
        await asyncio.Event().wait()
    finally:
        for r in reversed(runners):
            await r.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="the economics run's simulated tiers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("tiers", nargs="+", type=TierSpec.parse, help="NAME:PORT:BAD_ANSWER_RATE")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.tiers, args.seed))
        return
    uvloop.run(serve(args.tiers, args.seed))


if __name__ == "__main__":
    main()
