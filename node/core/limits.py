"""Rate limits and error tolerance, pure: they take the time as an argument."""

from __future__ import annotations

from collections import deque

__all__ = ["ErrorWindow", "KeyedBuckets", "SlidingWindow", "TokenBucket"]


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

    def is_full(self, now: float) -> bool:
        """Whether the bucket has refilled completely by ``now`` (it is then as good as new)."""
        return self._tokens + (now - self._last) * self.rate >= self.burst

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


class KeyedBuckets:
    """One :class:`TokenBucket` per key (a user), shared by everything of that key, so a
    limit does not start afresh when a client reconnects.

    Memory stays bounded by the keys seen within one refill time (``burst / rate``): a bucket
    that has refilled is the same as a new one, and is forgotten at the next sweep (run when
    the map has doubled since the last one).

    Args:
        rate: Tokens added per second to each bucket.
        burst: Size of each bucket.
    """

    __slots__ = ("_buckets", "_sweep_at", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[object, TokenBucket] = {}
        self._sweep_at = 64

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, key: object, now: float) -> TokenBucket:
        """The bucket of ``key`` (a full one the first time)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket

    def _sweep(self, now: float) -> None:
        self._buckets = {k: b for k, b in self._buckets.items() if not b.is_full(now)}
        self._sweep_at = max(64, 2 * len(self._buckets))


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
