"""How late this node answers, measured and announced (our extension of Lifeguard).

Lifeguard (LHA-Probe) stops a slow node from accusing others by stretching
its probe period by a health score; the score falls by one per answered
probe, so the longer deadlines that made the probes succeed wear off, the
node's deadline drops under its real round trip again, and it accuses the
next healthy member it probes. And nothing stops the others from timing the
slow node out: it is suspected, refutes and is suspected again every few
seconds for as long as it stays slow. Both are false suspicions.

So a node measures its own lateness, two ways, and takes the larger:

- the round trips of its direct probes: every direct ack, also one that
  comes after a relay's or the TCP ping's answer or after the probe gave up
  (keeping only the acks that won would keep only the fast ones). A slow
  receive path delays all of them; a slow target delays only the probes of
  it, so an upper quantile of recent round trips
  (`LatenessMeter`, the 75th percentile over `window` seconds) says how late
  *we* are without the odd slow peer pulling it up;
- how late its timers run (`StallMeter`). A stalled event loop (a long GC
  pause, a starved CPU, SIGSTOP) sends its probes only when it runs, so their
  round trips look fine, but its timers fire late by as much as a ping waits
  to be read.

Under `probe_timeout` it counts as not late at all. The node then

- waits that long (x `MARGIN`) past the usual deadline for its own probes,
  so it stops accusing members whose acks it was too slow to read, and
- announces it in its Alive (`LatenessAnnouncer`): on every refutation, and
  unasked when it reaches `probe_timeout`, grows by half, is half a `ttl`
  old, or is back under half of `probe_timeout`. Its probers and the relays
  they ask wait that much longer for it while the announcement is fresh.

The cost: a member that announced lateness L and then crashes is found about
L x MARGIN later. A healthy node's round trip, milliseconds, is under
`probe_timeout` and counts as 0, so a healthy cluster's timing is unchanged.
"""

from __future__ import annotations

from collections import deque

from gossip.messages import Addr

__all__ = ["MARGIN", "Lateness", "LatenessAnnouncer", "LatenessMeter", "StallMeter", "patience"]

MARGIN = 1.25
"""Extra wait = lateness x MARGIN: room for the jitter above the quantile."""

QUANTILE = 0.75
MIN_SAMPLES = 4  # fewer round trips than this say nothing yet
STALE = 4  # ... and the last MIN_SAMPLES are kept up to this many windows old
MAX_SAMPLES = 64


class LatenessMeter:
    """Recent round trips of our direct probes, and their upper quantile."""

    __slots__ = ("_cached", "_samples", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self._samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (at, rtt)
        self._cached: float | None = None  # asked for on every timer: sort only on change

    def add(self, rtt: float, now: float) -> None:
        self._samples.append((now, max(0.0, rtt)))
        self._cached = None

    def current(self, now: float) -> float:
        """The QUANTILE of the round trips of the last `window` seconds, or of the last
        MIN_SAMPLES if fewer came in it (0 with fewer than that)."""
        # A node at a high Lifeguard health probes every few seconds: keep its last
        # MIN_SAMPLES a while longer, or it could never measure the lateness it has.
        samples = self._samples
        while samples and (
            now - samples[0][0] > STALE * self.window
            or (len(samples) > MIN_SAMPLES and now - samples[0][0] > self.window)
        ):
            samples.popleft()
            self._cached = None
        if self._cached is None:
            if len(self._samples) < MIN_SAMPLES:
                self._cached = 0.0
            else:
                ordered = sorted(rtt for _, rtt in self._samples)
                self._cached = ordered[min(len(ordered) - 1, int(QUANTILE * len(ordered)))]
        return self._cached


class StallMeter:
    """How late a packet arriving at a random moment is read: our timers' lateness,
    weighted by time.

    A timer that fires `lag` late ended a stall of `lag` seconds; a packet that came
    during it waited what was left of it. Over the last `window` seconds, the delay at
    a random instant exceeds x with probability sum(max(0, lag - x)) / window, and
    `current` is the x where that falls to 1 - QUANTILE. Counting firings instead would
    miss a loop that stalls 0.3 s of every 0.5 s: its timers fire mostly on time in
    between, yet most packets reach it mid-stall.
    """

    __slots__ = ("_cached", "_stalls", "_total", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self._stalls: deque[tuple[float, float]] = deque()  # (ended at, length)
        self._total = 0.0  # the lengths in `_stalls`, summed
        self._cached: float | None = None

    def add(self, lag: float, now: float) -> None:
        if lag > 0:
            self._stalls.append((now, lag))
            self._total += lag
            self._cached = None

    def current(self, now: float) -> float:
        stalls = self._stalls
        while stalls and now - stalls[0][0] > self.window:
            self._total -= stalls.popleft()[1]
            self._cached = None
        if not stalls:
            self._total = 0.0  # no drift survives an empty window
        if self._cached is None:
            budget = (1 - QUANTILE) * self.window
            # A loop on time (every timer a little late, never long): the stalls do not
            # add up to the budget, so the quantile is 0 without sorting them (this runs
            # at every gossip timer)
            self._cached = (
                0.0 if self._total <= budget else _time_quantile([lag for _, lag in stalls], budget)
            )
        return self._cached


def _time_quantile(stalls: list[float], budget: float) -> float:
    """The x with sum(max(0, s - x)) == budget (0 if the stalls sum to less)."""
    ordered = sorted(stalls, reverse=True)
    total = 0.0
    for k, longest in enumerate(ordered, start=1):
        total += longest
        after = ordered[k] if k < len(ordered) else 0.0
        x = (total - budget) / k  # with the k longest above x: total - k x = budget
        if x >= after:
            return max(0.0, x)
    return 0.0


class LatenessAnnouncer:
    """When to tell the cluster our lateness unasked (see the module docstring)."""

    __slots__ = ("announced", "announced_at", "threshold", "ttl")

    def __init__(self, threshold: float, ttl: float) -> None:
        self.threshold, self.ttl = threshold, ttl
        self.announced = 0.0
        self.announced_at = -float("inf")

    def due(self, lateness: float, now: float) -> bool:
        if lateness >= self.threshold:
            return (
                self.announced < self.threshold
                or lateness > 1.5 * self.announced
                or now - self.announced_at >= self.ttl / 2
            )
        return self.announced >= self.threshold and lateness < self.threshold / 2

    def sent(self, lateness: float, now: float) -> None:
        self.announced, self.announced_at = lateness, now


def patience(announced: float, announced_at: float, now: float, ttl: float) -> float:
    """The lateness a member announced, while the announcement is younger than `ttl`."""
    return announced if now - announced_at < ttl else 0.0


class Lateness:
    """One node's side of it: what it measures of itself, what it announced, and how much
    time it gives a member. All zero when `enabled` is false (Lifeguard or lateness off)."""

    __slots__ = ("_announcer", "_direct", "_lag", "_meter", "enabled", "threshold", "ttl", "window")

    def __init__(self, *, enabled: bool, threshold: float, window: float, ttl: float) -> None:
        self.enabled, self.threshold, self.window, self.ttl = enabled, threshold, window, ttl
        self._meter = LatenessMeter(window)  # our direct probes' round trips
        self._lag = StallMeter(window)  # how late our timers run
        self._announcer = LatenessAnnouncer(threshold, ttl)
        # Our pings whose direct Ack has not come yet, answered another way or not: every
        # direct round trip is measured, or the ones a relay or TCP beat would be missed.
        self._direct: dict[int, tuple[float, Addr]] = {}  # seq -> (sent at, target)

    def own(self, now: float) -> float:
        """How late we answer: 0 if off, or under `threshold` (a LAN round trip; changing
        nothing then keeps a healthy cluster's timing exactly memberlist's)."""
        if not self.enabled:
            return 0.0
        late = max(self._meter.current(now), self._lag.current(now))
        return late if late >= self.threshold else 0.0

    def given(self, announced: float, announced_at: float, now: float) -> float:
        """The time to give a member that announced `announced` at `announced_at`."""
        return patience(announced, announced_at, now, self.ttl) if self.enabled else 0.0

    def pinged(self, seq: int, target: Addr, now: float) -> None:
        """We sent a direct Ping: its Ack, whenever it comes, is a round trip."""
        self._direct[seq] = (now, target)

    def acked(self, seq: int, source: Addr | None, now: float) -> bool:
        """An Ack for `seq` came from `source` (None: over TCP). True if `seq` was one of
        our pings. Only the direct UDP round trip measures us: a relay's or a TCP ack
        began after probe_timeout, so it measures the packet loss."""
        direct = self._direct.get(seq)
        if direct is None:
            return False
        if source == direct[1]:
            del self._direct[seq]
            self._meter.add(now - direct[0], now)
        return True

    def timer_fired(self, due: float, now: float) -> None:
        """Our timer due at `due` ran at `now`: a stalled loop runs its timers late, and
        reads its pings late too."""
        if self.enabled and now >= due:
            self._lag.add(now - due, now)

    def forget_old(self, now: float) -> None:
        horizon = now - self.window
        for seq, (sent_at, _) in list(self._direct.items()):  # oldest first: stop at a fresh one
            if sent_at >= horizon:
                break
            del self._direct[seq]

    def announce_due(self, now: float) -> bool:
        """Should we announce our lateness unasked (LatenessAnnouncer)?"""
        return self.enabled and self._announcer.due(self.own(now), now)

    def announced(self, now: float) -> float:
        """We are sending an Alive: the lateness it carries, remembered as announced."""
        late = self.own(now)
        self._announcer.sent(late, now)
        return late
