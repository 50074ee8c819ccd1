"""Running the proxy: `proxy serve` and its server, reload, metrics, logs, `proxy check`, and the
operational endpoints."""
