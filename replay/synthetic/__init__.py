"""A realistic, reproducible synthetic Kraken v2 market (theory of operation: market.py).

* `market.py`: `SyntheticMarket`, the market itself (true and client books, frames).
* `source.py`: `SyntheticSource`, the market as a live source for the replay server.
* `record.py`: `write_recording` and `python -m replay.synthetic`, which writes it as a
  recording.
"""

from .market import (
    GENERIC_PROFILES,
    PROFILES,
    STATUSES,
    Profile,
    SyntheticFrame,
    SyntheticMarket,
    render,
    rfc3339,
)
from .record import main, write_recording
from .source import SyntheticSource

__all__ = ["Profile", "PROFILES", "GENERIC_PROFILES", "STATUSES", "SyntheticMarket",
           "SyntheticFrame", "SyntheticSource", "render", "rfc3339", "write_recording", "main"]
