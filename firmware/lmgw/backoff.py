"""Reconnect delays: exponential backoff with full jitter, bounded.

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads
thousands of gateways reconnecting after a DSO restart, instead of having
them retry in synchronized waves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    min_delay: float = 1.0
    max_delay: float = 300.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.min_delay <= self.max_delay:
            raise ValueError("reconnect delays need 0 < min_delay <= max_delay")
        if self.factor < 1:
            raise ValueError("backoff factor must be at least 1")

    def ceiling(self) -> float:
        """Upper bound of the next delay: min_delay * factor**failures, capped at max_delay."""
        ceiling = self.min_delay
        for _ in range(self.failures):
            ceiling *= self.factor
            if ceiling >= self.max_delay:
                return self.max_delay
        return ceiling

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, self.ceiling())
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
