"""RELIABILITY.md's section on the money and secret promises (issue 11): the cases of
tests/test_adversarial.py and the figures they recorded, through the real `proxy serve`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

ADVERSARIAL = "tests/test_adversarial.py"
# The same promises checked case by case (in-process or through `proxy serve`): listed with their
# results, so each row of the table has its case here.
ALSO = (
    "tests/test_spend_caps.py",
    "tests/test_secrets.py",
    "tests/test_redirects.py",
    "tests/test_journal.py",
    "tests/test_breakers.py",
    "tests/test_slow_clients.py",
    "tests/test_oslimits.py",
)
FILES = (ADVERSARIAL, *ALSO)

# (figure the cases record in Observation.extra, what it is, its goal, how cases combine)
FIGURES: tuple[tuple[str, str, str, Callable[[Iterable[float]], float]], ...] = (
    ("overspend_factor", "overspend factor: paid spend / budget", "at most 1 + one call (1.1 here)", max),
    ("keys_found", "upstream keys found in responses, logs, ledger rows and metrics", "0", sum),
    ("acked_lost", "calls answered to the client but missing from the ledger after kill -9", "0", sum),
    ("breaker_closed_early", "breakers closed before their cooldown and probe", "0", sum),
)


def section(cases: list[Any], observations: dict[str, dict[str, Any]], add: Callable[[str], None]) -> None:
    mine = [c for c in cases if c.file == ADVERSARIAL]
    if not mine:
        return
    others = [c for c in cases if c.file in ALSO]
    add("## Money and secrets under attack")
    add("")
    add(
        f"`{ADVERSARIAL}`: what broke the promises when tried as an operator and an attacker would, with the "
        "concurrency that broke them, through `proxy serve`."
    )
    add("")
    add("| figure | this run | goal |")
    add("|---|---|---|")
    for key, label, goal, combine in FIGURES:
        values = [float(o["extra"][key]) for c in mine if key in (o := observations.get(c.nodeid, {})).get("extra", {})]
        shown = f"{combine(values):g} ({len(values)} case{'s' * (len(values) != 1)})" if values else "not measured"
        add(f"| {label} | {shown} | {goal} |")
    add("")
    add("| case | what was tried | result | client got | figures |")
    add("|---|---|---|---|---|")
    for c in mine:
        obs = observations.get(c.nodeid, {})
        extra = obs.get("extra") or {}
        figures = ", ".join(f"{k} {v}" for k, v in extra.items())
        result = {"pass": "pass", "fail": "**FAIL**", "xfail": "**known bug**", "skip": "skipped"}[c.result]
        add(
            f"| `{c.name}` | {_cell(obs.get('fault') or obs.get('description', c.function))} | {result} "
            f"| {_cell(obs.get('client', ''))} | {_cell(figures)} |"
        )
    add("")
    if others:
        add("The same promises, case by case:")
        add("")
        add("| file | case | result |")
        add("|---|---|---|")
        for c in others:
            result = {"pass": "pass", "fail": "**FAIL**", "xfail": "**known bug**", "skip": "skipped"}[c.result]
            add(f"| `{c.file.removeprefix('tests/')}` | {_cell(_words(c))} | {result} |")
        add("")


def _words(case: Any) -> str:
    text = case.function.removeprefix("test_").replace("_", " ")
    return f"{text} [{case.param}]" if case.param else text


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "—"
