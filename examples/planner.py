"""A strategic planner that talks to LLMs through the proxy, as the original agent does.

Only `base_url` changes from a plain OpenAI setup. Full plans may escalate to Kimi; re-plans after
a small change send `X-Replan: minor`, which the proxy never sends to a paid tier.

    proxy demo &            # or: proxy serve
    python examples/planner.py --base-url http://127.0.0.1:8080/v1
"""

from __future__ import annotations

import argparse

import openai


class StrategicPlanner:
    def __init__(self, base_url: str) -> None:
        # The proxy holds the upstream keys; this key is only checked if the proxy has client keys.
        self.client = openai.OpenAI(base_url=base_url, api_key="planner", max_retries=0)

    def plan(self, goal: str, *, complex_goal: bool = False) -> str:
        headers = {"X-Complexity": "complex"} if complex_goal else {}
        return self._ask(f"Make a step-by-step plan to: {goal}", headers)

    def replan(self, plan: str, observation: str) -> str:
        # A cheap re-plan: a free tier is good enough, never pay for it.
        return self._ask(f"Plan:\n{plan}\nNew observation: {observation}\nAdjust the plan.", {"X-Replan": "minor"})

    def _ask(self, prompt: str, headers: dict[str, str]) -> str:
        raw = self.client.chat.completions.with_raw_response.create(
            model="auto",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=200,
            extra_headers=headers,
        )
        answer = raw.parse().choices[0].message.content or ""
        print(
            f"[{raw.headers.get('x-proxy-route')} -> {raw.headers.get('x-proxy-tier')}, "
            f"{raw.headers.get('x-proxy-attempts')} attempt(s)]"
        )
        return answer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    args = parser.parse_args()
    planner = StrategicPlanner(args.base_url)
    plan = planner.plan("ship the release", complex_goal=True)
    print(plan, "\n")
    print(planner.replan(plan, "the CI is red"))


if __name__ == "__main__":
    main()
