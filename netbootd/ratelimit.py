"""Token buckets keyed by client, bounded: the per-MAC reply limit of proxy-DHCP and the
cluster-wide gate on new boots of machines not in the inventory (planner.py) share it.

Hand-written: the hot path runs it per packet, and a token bucket is a dozen lines; the
rate-limiting libraries on PyPI add locks, clocks of their own or asyncio coupling that
cost more than the bucket itself.
"""

from __future__ import annotations

from collections.abc import Callable


def _count_nothing() -> None:
    return None


class RateLimiter:
    """Token bucket per key (a MAC): ``rate`` per second, bursts of ``max(rate, 1)``.

    At most ``max_clients`` buckets: a new MAC beyond that forgets the oldest bucket
    (one dict deletion, counted through ``evicted``), so a flood of random MACs costs
    constant memory and constant time per packet."""

    def __init__(self, rate: float, *, max_clients: int = 65536,
                 evicted: Callable[[], object] = _count_nothing) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0)
        self._max = max_clients
        self._evicted = evicted
        self._buckets: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        b = self._buckets.get(key)
        if b is None:
            buckets = self._buckets
            while len(buckets) >= self._max:
                del buckets[next(iter(buckets))]
                self._evicted()
            buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = b[0] + (now - b[1]) * self.rate
        if tokens > self.burst:  # noqa: PLR1730 - a min() call per packet costs more
            tokens = self.burst
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            return False
        b[0] = tokens - 1.0
        return True
