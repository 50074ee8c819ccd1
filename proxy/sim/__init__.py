"""The simulated upstream (`proxy demo`, the tests' fake tiers, the benchmark's upstream) and `proxy demo`.

- `settings.py`: what a simulated tier does per request (`Behaviour`) and what it saw (`SimStats`)
- `bodies.py`: its completions, stream events and errors
- `upstream.py`: its server
- `demo.py`: three simulated tiers and the proxy in front of them
"""

from proxy.sim.settings import SIM_SETTINGS, SIM_STATS, Behaviour, RecordedRequest, SimSettings, SimStats
from proxy.sim.upstream import create_sim_app, start_sim

__all__ = [
    "SIM_SETTINGS",
    "SIM_STATS",
    "Behaviour",
    "RecordedRequest",
    "SimSettings",
    "SimStats",
    "create_sim_app",
    "start_sim",
]
