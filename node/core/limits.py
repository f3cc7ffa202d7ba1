"""Rate limits and error tolerance, pure: they take the time as an argument."""

from __future__ import annotations

from collections import deque

__all__ = ["ErrorWindow", "SlidingWindow", "TokenBucket"]


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


class SlidingWindow:
    """Counts what happened in the last ``window_s`` seconds, up to a limit.

    Holds at most ``limit + 1`` times: memory stays bounded whatever the caller does.

    Args:
        limit: How many are allowed within any ``window_s``.
        window_s: The window, in seconds.
    """

    __slots__ = ("_times", "limit", "window_s")

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def _forget(self, now: float) -> None:
        times = self._times
        while times and times[0] <= now - self.window_s:
            times.popleft()

    def full(self, now: float) -> bool:
        """Whether ``limit`` already happened within the window (one more would be too many)."""
        self._forget(now)
        return len(self._times) >= self.limit

    def add(self, now: float) -> bool:
        """Record one at ``now``; True when more than ``limit`` fell within the window."""
        self._times.append(now)
        self._forget(now)
        while len(self._times) > self.limit + 1:
            self._times.popleft()
        return len(self._times) > self.limit


class ErrorWindow(SlidingWindow):
    """Counts errors in the last minute; ``add`` says whether the tolerance is exceeded.

    Args:
        max_per_min: Errors tolerated within any 60 s.
    """

    __slots__ = ()

    def __init__(self, max_per_min: int) -> None:
        super().__init__(max_per_min, 60.0)

    @property
    def max_per_min(self) -> int:
        """Errors tolerated within any 60 s."""
        return self.limit
