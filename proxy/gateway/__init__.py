"""The request path, in the order a request meets it.

`state.py` (what the app holds) -> `auth.py` (client keys; `client_keys.py`: keys and their
limits) -> `client_io.py` (the client side: body, writes, protocol errors) -> `chat.py` (the
handler) -> `body.py` (parse once) -> `routing.py` (the plan) with `breaker.py` ->
`failover.py` (the attempt loop) -> `upstream.py` (one attempt) -> `relay.py` (a stream to the
client) with `sse.py` (watching it) and `usage.py` (its tokens); `redact.py` removes the
configured secrets from all an upstream sends back. `catalog.py`: GET /v1/models.
"""
