"""Rate limits and error tolerance, pure: they take the time as an argument."""

from __future__ import annotations

__all__ = ["ErrorWindow", "KeyedBuckets", "LimitCarry", "SlidingWindow", "TokenBucket"]


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

    def level(self, now: float) -> float:
        """The tokens the bucket holds at ``now`` (``now`` not before its last use)."""
        return min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)

    def copy(self) -> TokenBucket:
        """A bucket in the same state, used apart from this one."""
        twin = TokenBucket(self.rate, self.burst, self._last)
        twin._tokens = self._tokens
        return twin

    @property
    def last(self) -> float:
        """When it was last used."""
        return self._last

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are enough; return whether it was allowed."""
        elapsed = now - self._last
        if elapsed > 0:
            tokens = self._tokens + elapsed * self.rate
            self._tokens = tokens if tokens < self.burst else self.burst  # min() costs a call
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
                self.sweep(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket

    def find(self, key: object) -> TokenBucket | None:
        """The bucket of ``key`` if it has one (none is made)."""
        return self._buckets.get(key)

    def sweep(self, now: float) -> None:
        """Forget the buckets that have refilled (the same as none)."""
        self._buckets = {k: b for k, b in self._buckets.items() if not b.is_full(now)}
        self._sweep_at = max(64, 2 * len(self._buckets))


class SlidingWindow:
    """Counts what happened in the last ``window_s`` seconds, up to a limit.

    Holds at most ``limit + 1`` times: memory stays bounded whatever the caller does. A list,
    not a deque: every connection has one, mostly empty, and an empty deque is ~600 bytes; and
    the empty tuple until the first time (most connections never make an error).

    Args:
        limit: How many are allowed within any ``window_s``.
        window_s: The window, in seconds.
    """

    __slots__ = ("_times", "limit", "window_s")

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: list[float] | tuple[()] = ()

    def _forget(self, now: float) -> None:
        times = self._times
        edge = now - self.window_s
        if times and times[0] <= edge:
            assert isinstance(times, list)  # not empty: a list
            keep = 0
            while keep < len(times) and times[keep] <= edge:
                keep += 1
            del times[:keep]

    def full(self, now: float) -> bool:
        """Whether ``limit`` already happened within the window (one more would be too many)."""
        self._forget(now)
        return len(self._times) >= self.limit

    def add(self, now: float) -> bool:
        """Record one at ``now``; True when more than ``limit`` fell within the window."""
        times = self._times
        if not isinstance(times, list):
            times = self._times = []
        times.append(now)
        self._forget(now)  # trims the same list
        if len(times) > self.limit + 1:
            del times[:len(times) - self.limit - 1]
        return len(times) > self.limit


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

    def empty(self, now: float) -> bool:
        """Whether no error fell within the last minute."""
        self._forget(now)
        return not self._times

    def copy(self) -> ErrorWindow:
        """A window with the same errors, used apart from this one."""
        twin = ErrorWindow(self.limit)
        twin._times = list(self._times)
        return twin

    def merge(self, other: ErrorWindow) -> None:
        """Count ``other``'s errors too (the most recent ``limit + 1`` of both)."""
        times = sorted([*self._times, *other._times])[-(self.limit + 1):]
        self._times = times


#: A connection's limits: its buckets by name (``publish``, ``requests``) and its errors.
Limits = tuple[dict[str, TokenBucket], ErrorWindow]


class LimitCarry:
    """What a user's closed connections leave to the next one on the node: their emptiest
    buckets and their recent errors, so that reconnecting starts no fresh allowance.

    Concurrent connections of a user keep limits of their own; only what is left when one
    ends carries over, and only until it would have refilled. Memory stays bounded by the users
    whose connections ended within the last minute (forgotten entries are swept when the map
    has doubled since the last sweep).
    """

    __slots__ = ("_left", "_sweep_at")

    def __init__(self) -> None:
        self._left: dict[object, Limits] = {}
        self._sweep_at = 64

    def __len__(self) -> int:
        return len(self._left)

    def keep(self, key: object, buckets: dict[str, TokenBucket], errors: ErrorWindow) -> None:
        """A connection of ``key`` ended with these limits (they are not used by it any more)."""
        left = self._left.get(key)
        if left is None:
            self._left[key] = ({n: b.copy() for n, b in buckets.items()}, errors.copy())
            return
        kept, kept_errors = left
        for name, bucket in buckets.items():
            other = kept.get(name)
            at = bucket.last if other is None else max(bucket.last, other.last)
            if other is None or bucket.level(at) < other.level(at):
                kept[name] = bucket.copy()
        kept_errors.merge(errors)

    def restore(self, key: object, now: float) -> Limits | None:
        """What the ended connections of ``key`` left that still binds at ``now``: buckets not
        yet refilled and errors of the last minute (None when nothing does)."""
        if len(self._left) >= self._sweep_at:
            self.sweep(now)
        left = self._left.get(key)
        if left is None:
            return None
        buckets, errors = left
        binding = {name: b.copy() for name, b in buckets.items() if not b.is_full(now)}
        if not binding and errors.empty(now):
            del self._left[key]
            return None
        return binding, errors.copy()

    def sweep(self, now: float) -> None:
        """Forget what no longer binds (buckets refilled, no error within the minute)."""
        self._left = {k: v for k, v in self._left.items()
                      if not v[1].empty(now) or not all(b.is_full(now) for b in v[0].values())}
        self._sweep_at = max(64, 2 * len(self._left))

