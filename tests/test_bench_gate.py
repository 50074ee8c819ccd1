"""The benchmark's quality-gate pieces: the canned 2 KB plan passes the gate, the in-process
measurement runs, and nginx gets the plan's escaped quotes back as they were."""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from bench import gatecost, upstream
from proxy.config import QualitySpec
from proxy.gateway.quality import QualityGate


def test_the_canned_plan_is_about_2_kb_and_passes_the_schema_check() -> None:
    body = gatecost.plan_completion_body()
    content = json.loads(body)["choices"][0]["message"]["content"]
    assert 1900 <= len(content) <= 2100
    check = QualityGate(QualitySpec()).check_for(orjson.loads(gatecost.schema_body("plan2k")), None)
    assert check is not None and check.schema is not None
    assert check.judge(json.loads(body)) is None
    assert check.judge({"choices": [{"message": {"content": content[:900]}, "finish_reason": "stop"}]}) is not None


def test_the_in_process_figures_come_out_in_microseconds() -> None:
    out = gatecost.micro(reps=200, blocks=1)
    for key in ("unchecked_us", "off_us", "checked_2kb_schema_us", "checked_2kb_schema_stream_us"):
        assert 0 < out[key] < 10_000, key
    assert out["checked_2kb_schema_us"] > out["unchecked_us"]


def test_nginx_strings_keep_backslashes(tmp_path: Path) -> None:
    # nginx reads \\ in a quoted string as one backslash, so a JSON string's \" must be doubled.
    assert upstream._nginx_string(b'{"c":"{\\"a\\":1}"}') == '\'{"c":"{\\\\"a\\\\":1}"}\''
    conf = upstream.nginx_conf(tmp_path, 1)
    assert "location = /plan/v1/chat/completions" in conf
