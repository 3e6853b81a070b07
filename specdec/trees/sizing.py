"""Tree sizing: how many draft nodes a step sends, the default cost curve, and running rates.

With c_1, c_2, ... the acceptance chances of a drafter's nodes best first (ancestors first),
sending the n best yields 1 + c_1 + ... + c_n expected tokens per target forward, so n maximises

    value(n) = (1 + base + c_1 + ... + c_n) / (verify_cost(fixed + n) + draft_cost * (fixed + n))

over min_size <= n <= len(chances), ties to the smaller n; `fixed` nodes of summed chance `base`
are always sent. verify_cost(0) = 1 (the root alone): `specdec.Context.verify_cost`, the measured
curve or `DEFAULT_VERIFY_COST`.

Boundary: plain Python; callers compute (calibrate, clamp, order) the chances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

# Extra verify cost of one draft node, relative to a root-only forward, where no curve was
# measured (`specdec profile`); why 0.2: docs/design.md.
DEFAULT_TOKEN_COST = 0.2


@dataclass(frozen=True)
class LinearCost:
    """verify_cost(n) = 1 + per_token * n: the curve without a measurement, or a fixed override."""

    per_token: float

    def __post_init__(self) -> None:
        if not self.per_token >= 0:
            raise ValueError(f"LinearCost: per_token must be >= 0, got {self.per_token!r}")

    def __call__(self, n: int) -> float:
        return 1.0 + self.per_token * n


DEFAULT_VERIFY_COST = LinearCost(DEFAULT_TOKEN_COST)


class Size(NamedTuple):
    n: int  # chances taken (beyond the fixed nodes)
    expected: float  # 1 + base + c_1 + ... + c_n: expected tokens per target forward
    cost: float  # verify_cost(fixed + n) + draft_cost * (fixed + n), in target forwards

    @property
    def value(self) -> float:
        return self.expected / self.cost


def best_size(
    chances: Iterable[float], verify_cost: Callable[[int], float], *, min_size: int = 0, base: float = 0.0,
    fixed: int = 0, draft_cost: float = 0.0,
) -> Size:
    """The n that maximises value(n) (see the module docstring), with its expected tokens and cost."""
    chances = list(chances)
    if not 0 <= min_size <= len(chances) or fixed < 0 or not draft_cost >= 0:
        raise ValueError(f"best_size: need 0 <= min_size <= len(chances) ({len(chances)}), fixed >= 0 and "
                         f"draft_cost >= 0; got min_size={min_size}, fixed={fixed}, draft_cost={draft_cost}")

    def at(n: int, expected: float) -> Size:
        k = fixed + n
        return Size(n, expected, verify_cost(k) + draft_cost * k)

    expected = 1.0 + base
    best = at(0, expected) if min_size == 0 else None
    for n, chance in enumerate(chances, 1):
        expected += chance
        if n >= min_size:
            size = at(n, expected)
            if best is None or size.value > best.value:
                best = size
    return best


class RunningRate:
    """A decayed ratio hits / trials (a drafter's acceptance rate), starting at the prior.

    `add` weighs the past by `decay` and adds a step's evidence; `relax` moves toward the prior
    by the same weight (a step without evidence, so a rate too low to draft on is re-probed)."""

    __slots__ = ("hits", "trials", "prior", "decay")

    def __init__(self, hits: float = 1.0, trials: float = 2.0, decay: float = 0.95):
        if not (hits >= 0 and trials > 0 and 0 < decay <= 1):
            raise ValueError(f"RunningRate: need hits >= 0, trials > 0, 0 < decay <= 1; got {hits}, {trials}, {decay}")
        self.hits, self.trials, self.prior, self.decay = hits, trials, (hits, trials), decay

    @property
    def rate(self) -> float:
        return self.hits / self.trials

    def add(self, hits: float, trials: float) -> None:
        self.hits = self.hits * self.decay + hits
        self.trials = self.trials * self.decay + trials

    def relax(self) -> None:
        d = self.decay
        self.hits = self.hits * d + self.prior[0] * (1 - d)
        self.trials = self.trials * d + self.prior[1] * (1 - d)

    def __repr__(self) -> str:
        return f"RunningRate({self.hits:.4g}/{self.trials:.4g}, decay={self.decay})"
