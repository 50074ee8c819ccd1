"""Configuration: proxy.yaml (and the original `strategic_planner:` block) -> a frozen `Config`.

- `schema.py`: the file's shapes, decoded strictly with msgspec
- `strategic_planner.py`: the original system's block, mapped onto those shapes
- `load.py`: reading, validating and resolving (environment variables, names, prices)
- `origins.py`: `server.cors`'s origins, checked and normalised
- `urls.py`: passwords in the config's URLs (ledger.url, state.url, http_proxy)
- `resolved.py`: the frozen types every other part reads
"""

from proxy.config.load import ConfigError, build_config, load_config
from proxy.config.resolved import ClientKey, Config, Cors, Price, Tier, Transport, held_back
from proxy.config.schema import (
    AuthSpec,
    BudgetSpec,
    ClientKeySpec,
    FileSpec,
    LedgerSpec,
    PriceSpec,
    QualitySpec,
    RetrySpec,
    RoutingSpec,
    ServerSpec,
    StateSpec,
    TierSpec,
)

__all__ = [
    "AuthSpec",
    "BudgetSpec",
    "ClientKey",
    "ClientKeySpec",
    "Config",
    "ConfigError",
    "Cors",
    "FileSpec",
    "LedgerSpec",
    "Price",
    "PriceSpec",
    "QualitySpec",
    "RetrySpec",
    "RoutingSpec",
    "ServerSpec",
    "StateSpec",
    "Tier",
    "TierSpec",
    "Transport",
    "build_config",
    "held_back",
    "load_config",
]
