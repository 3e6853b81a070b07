"""The no-slowdown guard: speculation has to beat plain decoding, as measured, or it pauses.

It compares two running rates of seconds per committed token measured in this process:
speculative steps (draft + verify + overhead; a drafter asked that proposed nothing counts) and
plain steps (the root alone, the drafter not asked). Plain steps happen while paused, first in a
fresh guard, as a probe once the plain reference is `refresh` steps old, and for the last token.
A window of `probe_every` speculative steps that costs more per token than plain by more than
`margin` (or, from its third step, more than `early_fail` times plain) pauses drafting for
`pause` steps, doubling per consecutive failure up to `max_pause`. `begin` (a new request) ends
the pause but keeps the failure count: a drafter that failed last waits up to `request_wait`.

Boundary: core level, no model and no drafter type; only the choice to draft changes, so
outputs stay exact. Why these defaults: docs/design.md, "The no-slowdown guard".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Guard:
    # Speculative steps before a window's first verdict (and before a probe of a `refresh`-old reference).
    probe_every: int = 8
    refresh: int = 256  # steps after which the plain reference is measured again
    pause: int = 16  # plain steps after the first failure (doubles on consecutive failures)
    max_pause: int = 512
    # Most plain steps a request waits before its first probe when the drafter's last window failed.
    request_wait: int = 32
    margin: float = 0.0  # tolerated slowdown, as a fraction of the plain time per token
    early_fail: float = 2.0  # a window fails before probe_every steps (from step 3) once this many times slower
    alpha: float = 0.25  # weight of the newest step in the running averages
    # State, kept across generate() calls when the same Guard is passed again.
    _spec: tuple[float, float] | None = field(default=None, repr=False)  # running (seconds, tokens) per step
    _plain: tuple[float, float] | None = field(default=None, repr=False)
    _since_plain: int = field(default=0, repr=False)  # steps since the last plain measurement
    _paused: int = field(default=0, repr=False)  # plain steps left in the current pause
    _failures: int = field(default=0, repr=False)
    _spec_steps: int = field(default=0, repr=False)  # speculative steps since the last verdict

    def __post_init__(self) -> None:
        if (min(self.probe_every, self.refresh, self.pause, self.max_pause) < 1 or self.request_wait < 0
                or not 0 < self.alpha <= 1 or self.margin < 0 or self.early_fail < 1 + self.margin):
            raise ValueError(
                "Guard: probe_every, refresh, pause and max_pause must be >= 1, request_wait >= 0, 0 < alpha <= 1, "
                "margin >= 0 and early_fail >= 1 + margin"
            )

    @property
    def spec_s(self) -> float | None:
        """Seconds per committed token while speculating (None before a speculative step)."""
        return None if self._spec is None else self._spec[0] / self._spec[1]

    @property
    def plain_s(self) -> float | None:
        """Seconds per committed token decoding plainly (None before a plain step)."""
        return None if self._plain is None else self._plain[0] / self._plain[1]

    def begin(self) -> None:
        """A new request (`generate` calls this first). Its text may suit the drafter where the last
        one did not, so a pause does not carry over; the rates and the count of consecutive
        failures do, and a drafter that failed last waits up to `request_wait` steps."""
        self._paused = min(self.request_wait, self._backoff()) if self._failures else 0
        self._new_window()

    def _backoff(self) -> int:
        """Plain steps of the pause after the current run of failures."""
        return min(self.max_pause, self.pause * 2 ** min(self._failures - 1, 30))

    def _new_window(self) -> None:
        self._spec_steps, self._spec = 0, None  # the next speculative steps are judged afresh

    def speculate(self) -> bool:
        """Whether the next step may draft."""
        if self._paused > 0 or self.plain_s is None:  # a fresh guard measures plain decoding first,
            return False  # so its first window can be judged (and fail early) from its third step
        stale = self._since_plain >= self.refresh
        return not (stale and self._spec_steps >= self.probe_every)  # else: a forced plain probe

    def record(self, drafted: bool, tokens: int, seconds: float) -> None:
        """One finished step: whether the drafter was asked, the tokens it committed, its wall time."""
        step = (seconds, max(1, tokens))
        if not drafted:
            self._plain = _ema(self._plain, step, self.alpha)
            self._since_plain = 0
            if self._paused > 0:
                self._paused -= 1
                if self._paused == 0:
                    self._new_window()
            return
        self._since_plain += 1
        self._spec_steps += 1
        self._spec = _ema(self._spec, step, self.alpha)
        if self.plain_s is None or self._spec_steps < min(3, self.probe_every):
            return
        limit = 1 + self.margin if self._spec_steps >= self.probe_every else self.early_fail
        if self.spec_s > self.plain_s * limit:
            self._failures += 1
            self._paused = self._backoff()
        elif self._spec_steps >= self.probe_every:
            self._failures = 0


def _ema(old: tuple[float, float] | None, new: tuple[float, float], alpha: float) -> tuple[float, float]:
    return new if old is None else tuple((1 - alpha) * o + alpha * n for o, n in zip(old, new))
