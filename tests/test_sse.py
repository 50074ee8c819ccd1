"""proxy.sse.StreamWatch: what the client sees of an upstream stream (bytes unchanged but for the
usage the proxy asked for on its behalf), and what the proxy learns from it (first event, usage,
[DONE], errors, a cut or endless stream), however the bytes are split into chunks."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.gateway.sse import StreamWatch
from proxy.records import Usage, UsageSource

MODEL = "llama3.1:8b"
USAGE = {"prompt_tokens": 11, "completion_tokens": 22, "prompt_tokens_details": {"cached_tokens": 4}}
EXPECTED_USAGE = Usage(11, 22, 4, UsageSource.UPSTREAM)


def chunk_doc(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


# What a server sends for `stream_options.include_usage`: "usage":null on every chunk, then a
# usage-only chunk with empty choices, then [DONE].
CONTENT = [
    chunk_doc({"role": "assistant", "content": ""}),
    chunk_doc({"content": "Hello"}),
    chunk_doc({"content": " world"}),
    chunk_doc({}, "stop"),
]
USAGE_DOC = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": MODEL, "choices": [], "usage": USAGE}


def event(doc: object, eol: bytes = b"\n") -> bytes:
    payload = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return b"data: " + payload + eol + eol


def with_usage_stream(eol: bytes = b"\n") -> bytes:
    return b"".join(
        [*(event({**d, "usage": None}, eol) for d in CONTENT), event(USAGE_DOC, eol), event(b"[DONE]", eol)]
    )


def stripped_stream(eol: bytes = b"\n") -> bytes:
    """What a client that did not ask for usage must get from with_usage_stream()."""
    return b"".join([*(event(d, eol) for d in CONTENT), event(b"[DONE]", eol)])


def relay(watch: StreamWatch, chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Everything forwarded to the client, and what each feed() returned."""
    pieces = [watch.feed(c) for c in chunks]
    pieces.append(watch.finish())
    return b"".join(pieces), pieces


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def state(w: StreamWatch) -> tuple[object, ...]:
    return (w.first, w.model, w.usage, w.done, w.data_events, w.error, w.truncated, w.overflow, w.buffer)


# ------------------------------------------------------------------------- a whole stream


def test_without_strip_the_bytes_pass_unchanged_and_usage_is_read() -> None:
    stream = with_usage_stream()
    watch = StreamWatch(strip_usage=False)
    out, _ = relay(watch, [stream])
    assert out == stream
    assert watch.usage == EXPECTED_USAGE
    assert watch.done
    assert watch.data_events == 6
    assert watch.first == {**CONTENT[0], "usage": None}
    assert watch.model == MODEL
    assert watch.first_is_completion_chunk
    assert (watch.error, watch.truncated, watch.overflow) == (None, False, False)


def test_strip_removes_the_usage_chunk_and_the_usage_nulls_but_still_reads_usage() -> None:
    watch = StreamWatch(strip_usage=True)
    out, _ = relay(watch, [with_usage_stream()])
    assert out == stripped_stream()
    assert b"usage" not in out
    assert watch.usage == EXPECTED_USAGE
    assert watch.done
    assert watch.first == CONTENT[0]


def test_strip_keeps_usage_that_rides_on_a_content_chunk() -> None:
    """Some servers put usage on the last chunk with choices: that chunk is content, kept whole."""
    last = chunk_doc({}, "stop", usage=USAGE)
    stream = event(CONTENT[1]) + event(last) + event(b"[DONE]")
    watch = StreamWatch(strip_usage=True)
    out, _ = relay(watch, [stream])
    assert out == stream
    assert watch.usage == EXPECTED_USAGE


def test_usage_with_a_space_after_the_colon_and_moonshots_cached_tokens_field() -> None:
    usage_event = (
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "cached_tokens": 5}}\n\n'
    )
    stream = event(CONTENT[1]) + usage_event + event(b"[DONE]")
    watch = StreamWatch(strip_usage=True)
    out, _ = relay(watch, [stream])
    assert out == event(CONTENT[1]) + event(b"[DONE]")
    assert watch.usage == Usage(7, 3, 5, UsageSource.UPSTREAM)


def test_an_unusable_usage_object_is_neither_read_nor_stripped() -> None:
    bad = event({"choices": [], "usage": {"prompt_tokens": "11", "completion_tokens": 22}})
    stream = event(CONTENT[1]) + bad + event(b"[DONE]")
    watch = StreamWatch(strip_usage=True)
    out, _ = relay(watch, [stream])
    assert out == stream
    assert watch.usage is None


def test_done_only_once_the_done_event_arrives() -> None:
    watch = StreamWatch(strip_usage=False)
    watch.feed(event(CONTENT[1]) + event(CONTENT[3]))
    assert not watch.done
    watch.feed(event(b"[DONE]"))
    assert watch.done


def test_a_stream_without_done_is_not_done_nor_truncated() -> None:
    watch = StreamWatch(strip_usage=False)
    stream = event(CONTENT[1]) + event(CONTENT[3])
    out, _ = relay(watch, [stream])
    assert out == stream
    assert not watch.done and not watch.truncated


# ------------------------------------------------------------------- chunk boundaries


def test_every_single_split_gives_the_same_bytes_and_findings() -> None:
    for strip in (False, True):
        stream = with_usage_stream()
        whole = StreamWatch(strip_usage=strip)
        expected, _ = relay(whole, [stream])
        for i in range(len(stream) + 1):
            watch = StreamWatch(strip_usage=strip)
            out, _ = relay(watch, [stream[:i], stream[i:]])
            assert out == expected, f"strip_usage={strip}, split at byte {i}"
            assert state(watch) == state(whole), f"strip_usage={strip}, split at byte {i}"


def test_one_byte_at_a_time() -> None:
    stream = with_usage_stream()
    watch = StreamWatch(strip_usage=True)
    out, pieces = relay(watch, [stream[i : i + 1] for i in range(len(stream))])
    assert out == stripped_stream()
    assert watch.usage == EXPECTED_USAGE and watch.done and watch.first == CONTENT[0]
    assert len([p for p in pieces if p]) == len(CONTENT) + 1, "one forward per complete event kept"


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(data=st.data(), strip=st.booleans(), crlf=st.booleans())
def test_any_split_forwards_whole_events_only_and_the_same_bytes(data: st.DataObject, strip: bool, crlf: bool) -> None:
    eol = b"\r\n" if crlf else b"\n"
    stream = b": keep-alive" + eol + eol + with_usage_stream(eol)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    whole = StreamWatch(strip_usage=strip)
    expected, _ = relay(whole, [stream])
    watch = StreamWatch(strip_usage=strip)
    out, pieces = relay(watch, split(stream, cuts))
    assert out == expected
    assert state(watch) == state(whole)
    for piece in pieces:  # a client never gets half an event
        assert piece == b"" or piece.endswith(eol + eol), piece


# ---------------------------------------------------------------------- the first event


def test_first_event_is_the_first_data_event_after_comments() -> None:
    watch = StreamWatch(strip_usage=False)
    assert watch.feed(b": keep-alive\n\n") == b": keep-alive\n\n"
    assert watch.first is None and watch.data_events == 0
    assert not watch.first_is_completion_chunk
    watch.feed(event(CONTENT[1]) + event(CONTENT[2]))
    assert watch.first == CONTENT[1]
    assert watch.data_events == 2


def test_a_comment_mentioning_data_does_not_hide_the_first_event() -> None:
    """`_first_data_line` skips a `data:` inside a comment, so the first event is found."""
    watch = StreamWatch(strip_usage=False)
    watch.feed(b": waiting for data: soon\n\n" + event(CONTENT[1]))
    assert watch.first == CONTENT[1]


def test_a_comment_mentioning_data_is_not_a_data_event() -> None:
    watch = StreamWatch(strip_usage=False)
    watch.feed(b": waiting for data: soon\n\n")
    assert watch.data_events == 0
    assert watch.first is None, "the first event is still to come"
    watch.feed(b': data: again\r\n\r\ndata: {"choices": []}\r\n\r\n')
    assert watch.data_events == 1 and watch.first_is_completion_chunk


def test_first_event_of_another_shape_is_not_a_completion_chunk() -> None:
    created = {"type": "response.created", "model": 7, "response": {"id": "resp-1"}}
    watch = StreamWatch(strip_usage=False)
    watch.feed(event(created))
    assert watch.first == created
    assert not watch.first_is_completion_chunk
    assert watch.model is None, "a model that is not a string is not taken"
    assert watch.error is None


def test_first_event_not_json() -> None:
    watch = StreamWatch(strip_usage=False)
    assert watch.feed(b"data: <html>oops\n\n") == b"data: <html>oops\n\n"
    assert watch.error == "the first stream event is not JSON"
    assert watch.first == {}
    assert not watch.first_is_completion_chunk


def test_first_event_json_but_not_an_object() -> None:
    watch = StreamWatch(strip_usage=False)
    watch.feed(b"data: [1, 2]\n\n")
    assert watch.error == "the first stream event is not a JSON object"
    assert not watch.first_is_completion_chunk


# --------------------------------------------------------------------------- error events


def test_error_event_is_read_and_forwarded() -> None:
    err = event({"error": {"message": "rate limited", "type": "rate_limit_error"}})
    watch = StreamWatch(strip_usage=True)
    out, _ = relay(watch, [event(CONTENT[1]), err])
    assert out == event(CONTENT[1]) + err
    assert watch.error == "rate limited"


def test_error_that_is_not_an_object_and_a_long_message() -> None:
    watch = StreamWatch(strip_usage=False)
    watch.feed(event(CONTENT[1]) + event({"error": "boom"}))
    assert watch.error == "boom"
    long = StreamWatch(strip_usage=False)
    long.feed(event(CONTENT[1]) + event({"error": {"message": "x" * 2000}}))
    assert long.error == "x" * 500


def test_an_error_key_on_a_completion_chunk_and_the_word_in_content_are_not_errors() -> None:
    watch = StreamWatch(strip_usage=False)
    watch.feed(event(CONTENT[1]) + event(chunk_doc({"content": 'say "error"'}, error=None)))
    assert watch.error is None


# ------------------------------------------------------------------------- end of stream


def test_stream_ending_mid_line_is_truncated_and_the_half_line_is_not_forwarded() -> None:
    watch = StreamWatch(strip_usage=False)
    out, pieces = relay(watch, [event(CONTENT[1]) + b'data: {"id":"chatcmpl-1","cho'])
    assert out == event(CONTENT[1])
    assert pieces[-1] == b""
    assert watch.truncated


def test_last_event_missing_only_its_blank_line_still_counts() -> None:
    for eol in (b"\n", b"\r\n"):
        watch = StreamWatch(strip_usage=False)
        out, _ = relay(watch, [event(CONTENT[1], eol) + b"data: " + orjson.dumps(CONTENT[3]) + eol])
        assert out == event(CONTENT[1], eol) + b"data: " + orjson.dumps(CONTENT[3]) + b"\n\n"
        assert watch.data_events == 2 and not watch.truncated


def test_done_without_any_newline_still_counts() -> None:
    watch = StreamWatch(strip_usage=False)
    out, _ = relay(watch, [event(CONTENT[1]) + b"data: [DONE]"])
    assert out == event(CONTENT[1]) + b"data: [DONE]\n\n"
    assert watch.done and not watch.truncated


def test_a_stray_line_end_after_the_last_event_is_not_truncation() -> None:
    watch = StreamWatch(strip_usage=False)
    out, _ = relay(watch, [event(b"[DONE]") + b"\r\n"])
    assert out == event(b"[DONE]")
    assert watch.done and not watch.truncated


# ------------------------------------------------------------------------------- overflow


def test_an_unterminated_event_past_max_event_bytes_overflows() -> None:
    watch = StreamWatch(strip_usage=False, max_event_bytes=100)
    assert watch.feed(b"data: " + b"x" * 54) == b""  # 60 bytes held
    assert not watch.overflow
    assert watch.feed(b"x" * 40) == b""  # exactly 100: still allowed
    assert not watch.overflow
    assert watch.feed(b"x") == b""
    assert watch.overflow
    assert watch.buffer == b"", "what was held is let go"


def test_events_within_max_event_bytes_pass() -> None:
    stream = event(CONTENT[1]) + event(b"[DONE]")
    watch = StreamWatch(strip_usage=False, max_event_bytes=max(len(e) for e in stream.split(b"\n\n")) + 2)
    out, _ = relay(watch, [stream[i : i + 1] for i in range(len(stream))])
    assert out == stream
    assert not watch.overflow and watch.done


# ----------------------------------------------------------------------- CRLF, keep-alives


def test_crlf_stream_passes_unchanged_and_is_understood() -> None:
    stream = with_usage_stream(b"\r\n")
    watch = StreamWatch(strip_usage=False)
    out, _ = relay(watch, [stream])
    assert out == stream
    assert watch.usage == EXPECTED_USAGE and watch.done and watch.first_is_completion_chunk


def test_crlf_stream_stripped() -> None:
    watch = StreamWatch(strip_usage=True)
    out, _ = relay(watch, [with_usage_stream(b"\r\n")])
    assert out == stripped_stream(b"\r\n")
    assert watch.usage == EXPECTED_USAGE


def test_keep_alive_comments_pass_through_and_are_not_data() -> None:
    ping = b": keep-alive\n\n"
    stream = ping + event(CONTENT[1]) + ping + ping + event(b"[DONE]") + ping
    watch = StreamWatch(strip_usage=True)
    out, _ = relay(watch, [stream])
    assert out == stream
    assert watch.data_events == 2
    assert watch.first == CONTENT[1]


def test_only_keep_alives_is_no_first_event() -> None:
    watch = StreamWatch(strip_usage=False)
    out, _ = relay(watch, [b": ping\n\n", b": ping\r\n\r\n"])
    assert out == b": ping\n\n: ping\r\n\r\n"
    assert watch.first is None and watch.data_events == 0 and not watch.done and not watch.truncated
