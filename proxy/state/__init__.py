"""Where breakers, budgets and client limits live: in the process (the default: the objects of
gateway/breaker.py, ledger/budget.py and gateway/client_keys.py) or, with `state.url`, in Redis
or Valkey, shared by every process and machine that names it.

- `link.py`: the connection: a timeout on every call, falling back to the process's own state
  when Redis fails, the heartbeat, reconnecting and rejoining in the background
- `scripts.py`: the Lua scripts that make each rule atomic across processes
- `spend.py`: budget reservations and spend per window, each client key's daily spend
- `breakers.py`: each tier's breaker and its single half-open probe, mirrored in each process from
  Redis's events (no round trip on a closed breaker)
- `shared.py`: the whole, as the app holds it (rates per client key, status for /readyz and /metrics)
"""
