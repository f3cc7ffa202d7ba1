"""Rate limits and error tolerance, pure: they take the time as an argument."""

from __future__ import annotations

from collections import deque

__all__ = ["ErrorWindow", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up.

    Args:
        rate: Tokens added per second.
        burst: Bucket size (and the initial fill).
        now: The current time in seconds (monotonic).
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are enough; return whether it was allowed."""
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False


class ErrorWindow:
    """Counts errors in the last minute; ``add`` says whether the tolerance is exceeded.

    Args:
        max_per_min: Errors tolerated within any 60 s.
    """

    __slots__ = ("_times", "max_per_min")

    def __init__(self, max_per_min: int) -> None:
        self.max_per_min = max_per_min
        self._times: deque[float] = deque()

    def add(self, now: float) -> bool:
        """Record one error at ``now``; True when more than ``max_per_min`` fell within 60 s."""
        times = self._times
        times.append(now)
        while times and times[0] <= now - 60.0:
            times.popleft()
        return len(times) > self.max_per_min
