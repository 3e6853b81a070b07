"""The one sizing rule, the one default cost curve and the one running rate (`specdec.trees.sizing`):
their parameters, and a scan of specdec/ that no module defines its own copy again."""

import ast
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import specdec
from conftest import random_prompt, tiny_model
from specdec.drafter import Context
from specdec.drafters import PromptLookup
from specdec.trees import DEFAULT_VERIFY_COST, LinearCost, RunningRate, best_size
from specdec.trees.sizing import DEFAULT_TOKEN_COST

ROOT = Path(__file__).resolve().parents[1] / "specdec"
SIZING = ROOT / "trees" / "sizing.py"


# ---- best_size ---------------------------------------------------------------------------------
def geometric(a: float, n: int) -> list[float]:
    return [a**k for k in range(1, n + 1)]


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 1), st.integers(1, 12), st.floats(0, 1))
def test_a_geometric_chain_drafts_more_when_tokens_are_cheaper_or_likelier(a, max_len, per_token):
    cost = LinearCost(per_token)
    n = best_size(geometric(a, max_len), cost).n
    assert 0 <= n <= max_len
    if per_token == 0 and a > 1e-3:
        assert n == max_len  # free tokens: draft all
    if a == 0 and per_token > 0:
        assert n == 0  # hopeless drafts: skip
    assert best_size(geometric(min(1.0, a + 0.2), max_len), cost).n >= n  # better odds never draft less


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1), max_size=8).map(lambda c: sorted(c, reverse=True)),
    st.lists(st.floats(0, 2), min_size=12, max_size=12),  # cost increments: a non-decreasing curve
    st.integers(0, 3), st.floats(0, 2), st.integers(0, 3), st.floats(0, 1),
)
@example([1.967677662142362e-14], [0.0] * 12, 0, 0.0, 0, 0.0)  # a tiny gain is still a gain
def test_best_size_maximises_the_documented_value(chances, steps, fixed, base, min_size, draft_cost):
    """value(n) = (1 + base + c_1 + ... + c_n) / (verify(fixed + n) + draft_cost * (fixed + n)),
    recomputed exactly: the chosen n attains the maximum, and no smaller n does."""
    min_size = min(min_size, len(chances))
    curve = [1.0]
    for s in steps:
        curve.append(curve[-1] + s)
    size = best_size(chances, curve.__getitem__, min_size=min_size, base=base, fixed=fixed, draft_cost=draft_cost)

    def value(n):
        k = fixed + n
        return (1 + Fraction(base) + sum(map(Fraction, chances[:n]))) / (Fraction(curve[k]) + Fraction(draft_cost) * k)

    values = {n: value(n) for n in range(min_size, len(chances) + 1)}
    top = max(values.values())
    assert min_size <= size.n <= len(chances)
    assert float(abs(values[size.n] - top)) <= 1e-12 * float(top)
    assert all(values[size.n] > v for n, v in values.items() if n < size.n)  # exact ties: the smaller n
    assert size.value == pytest.approx(float(top), rel=1e-12)


def test_min_size_forces_a_node_even_when_drafting_does_not_pay():
    hopeless = [0.0, 0.0]
    assert best_size(hopeless, LinearCost(1.0)).n == 0  # retrieval, prompt lookup: may send nothing
    forced = best_size(hopeless, LinearCost(1.0), min_size=1)  # a merge or Eagle: at least one node
    assert forced.n == 1 and forced.value == pytest.approx(0.5)
    with pytest.raises(ValueError, match="min_size"):
        best_size([0.5], LinearCost(1.0), min_size=2)


def test_ties_go_to_the_smaller_size():
    free = LinearCost(0.0)
    assert best_size([0.0, 0.0], free).n == 0
    assert best_size([0.5, 0.0, 0.0], free).n == 1


def test_fixed_nodes_count_in_the_cost_and_base_in_the_gain():
    """Jacobi's chain: `fixed` nodes are always sent, so the extra ones are priced from there."""
    knee = lambda k: 1.0 if k <= 3 else 10.0  # noqa: E731 - free up to 3 nodes, then dear
    assert best_size([0.5], knee).n == 1
    kept = best_size([0.5], knee, fixed=3, base=0.7)
    assert kept.n == 0 and kept.expected == pytest.approx(1.7) and kept.cost == 1.0
    assert best_size([0.5], knee, fixed=3, base=0.7).value < best_size([0.5], knee, fixed=2, base=0.7).value


def test_draft_cost_prices_every_drafted_node():
    likely = [0.9] * 4
    assert best_size(likely, LinearCost(0.0)).n == 4
    assert best_size(likely, LinearCost(0.0), draft_cost=1.0).n == 0  # each node costs a target forward
    chain = best_size(likely, LinearCost(0.0), draft_cost=1.0, min_size=1)  # LayerSkip/EarlyExit's value
    assert chain.n == 1 and chain.cost == 2.0 and chain.value < 1  # below 1: plain decoding is faster
    with pytest.raises(ValueError, match="draft_cost"):
        best_size(likely, LinearCost(0.0), draft_cost=-0.1)


# ---- the default cost curve ---------------------------------------------------------------------
def test_the_default_curve_is_linear_in_the_default_token_cost():
    assert DEFAULT_VERIFY_COST == LinearCost(DEFAULT_TOKEN_COST)
    assert DEFAULT_VERIFY_COST(0) == 1.0 and DEFAULT_VERIFY_COST(5) == pytest.approx(1 + 5 * DEFAULT_TOKEN_COST)
    with pytest.raises(ValueError, match="per_token"):
        LinearCost(-1.0)


def test_drafters_always_get_a_curve(tmp_path, monkeypatch):
    """No stored profile: the core hands over the default curve (drafters never see None)."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    assert Context(torch.tensor([1])).verify_cost is DEFAULT_VERIFY_COST
    seen = []

    class Spy(PromptLookup):
        def propose(self, ctx):
            seen.append(ctx.verify_cost)
            return super().propose(ctx)

    specdec.generate(tiny_model(), random_prompt(8, 16), Spy(min_ngram=1), max_new_tokens=4, guard=None)
    assert seen and all(c is DEFAULT_VERIFY_COST for c in seen)


# ---- RunningRate --------------------------------------------------------------------------------
def test_running_rate_decays_old_evidence_and_relaxes_to_its_prior():
    r = RunningRate(1.0, 2.0, decay=0.5)
    assert r.rate == 0.5
    r.add(3, 3)
    assert (r.hits, r.trials) == (3.5, 4.0)
    r.add(0, 4)
    assert (r.hits, r.trials) == (1.75, 6.0)
    for _ in range(60):
        r.relax()
    assert r.rate == pytest.approx(0.5) and r.trials == pytest.approx(2.0)
    never = RunningRate(1.0, 1.0, decay=1.0)
    never.add(0, 3)
    never.relax()
    assert (never.hits, never.trials) == (1.0, 4.0)  # decay 1: nothing forgotten, no drift


@pytest.mark.parametrize("args", [(1.0, 0.0, 0.9), (-1.0, 2.0, 0.9), (1.0, 2.0, 0.0), (1.0, 2.0, 1.5)])
def test_running_rate_refuses_bad_priors_and_decays(args):
    with pytest.raises(ValueError, match="RunningRate"):
        RunningRate(*args)


# ---- one definition each ------------------------------------------------------------------------
def modules():
    return [(p, ast.parse(p.read_text())) for p in sorted(ROOT.rglob("*.py"))]


def names_in(node) -> set[str]:
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            found.add(n.id)
        elif isinstance(n, ast.Attribute):
            found.add(n.attr)
        elif isinstance(n, (ast.arg, ast.keyword)) and n.arg:
            found.add(n.arg)
    return {name.lower() for name in found}


def where(path: Path, node) -> str:
    return f"{path.relative_to(ROOT.parent)}:{node.lineno}"


def test_each_idea_is_defined_once():
    defined: dict[str, list[str]] = {}
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(where(path, node))
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                if isinstance(t, ast.Name) and "TOKEN_COST" in t.id:  # a constant, not a token_cost= option
                    defined.setdefault("*TOKEN_COST", []).append(where(path, node))
    for name in ("best_size", "RunningRate", "LinearCost", "*TOKEN_COST"):
        places = defined.get(name, [])
        assert len(places) == 1 and places[0].startswith("specdec/trees/sizing.py"), (name, places)
    assert "_cost" not in defined, f"a drafter-level cost fallback is back: {defined['_cost']}"


def is_decay(node) -> bool:
    return isinstance(node, (ast.Name, ast.Attribute)) and "decay" in (getattr(node, "id", None) or node.attr).lower()


def copies_in(tree: ast.AST) -> list[tuple[str, int]]:
    """Markers of a copy of sizing.py's ideas: a division by a call to a cost or verify curve in a
    loop, comprehension or lambda (the sizing loop), the default token cost as a number next to a
    cost name, a test of verify_cost for None or ``verify_cost or (lambda ...)`` (a drafter's own
    fallback), and a product with a decay factor or a plain alias of one (a hand-rolled running
    rate)."""
    found = set()
    for scope in ast.walk(tree):
        if isinstance(scope, (ast.For, ast.While, ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.Lambda)):
            for node in ast.walk(scope):
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                    calls = [c for c in ast.walk(node.right) if isinstance(c, ast.Call)]
                    if any("cost" in name or "verify" in name for c in calls for name in names_in(c.func)):
                        found.add(("sizing rule", node.lineno))
    aliases = set()  # names bound to a decay factor itself (d = self._DECAY; d, old = self.decay, ...)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple) and isinstance(
                    node.value, ast.Tuple) else [(target, node.value)]
                aliases |= {t.id for t, v in pairs if isinstance(t, ast.Name) and is_decay(v)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.stmt) and not hasattr(node, "body")) or isinstance(node, ast.arguments):
            numbers = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and type(n.value) is float}
            if DEFAULT_TOKEN_COST in numbers and any("cost" in name for name in names_in(node)):
                found.add(("default token cost", getattr(node, "lineno", 0)))
        if isinstance(node, ast.Compare) and "verify_cost" in names_in(node.left) and any(
            isinstance(c, ast.Constant) and c.value is None for c in node.comparators
        ):
            found.add(("cost fallback", node.lineno))
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and any(
            "verify_cost" in names_in(v) for v in node.values
        ) and any(isinstance(v, ast.Lambda) for v in node.values):
            found.add(("cost fallback", node.lineno))
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, ast.Mult):
            operands = [node.target, node.value] if isinstance(node, ast.AugAssign) else [node.left, node.right]
            if any(is_decay(o) or (isinstance(o, ast.Name) and o.id in aliases) for o in operands):
                found.add(("running rate", node.lineno))
    return sorted(found, key=lambda f: f[1])


def test_no_module_repeats_the_rule_the_default_or_the_counter():
    copies = []
    for path, tree in modules():
        # Token recycling's per-(depth, rank) count tables are not one rate: they keep their own decay.
        allowed = {"running rate"} if path.name == "token_recycling.py" else set()
        if path != SIZING:
            copies += [(kind, f"{path.relative_to(ROOT.parent)}:{line}")
                       for kind, line in copies_in(tree) if kind not in allowed]
    assert not copies, copies


@pytest.mark.parametrize("kind, source", [
    ("sizing rule", "for n, a in enumerate(c, 1):\n    e += a\n    v = e / cost(n)\n"),
    ("sizing rule", "n = max(range(len(e)), key=lambda i: (e[i] / verify_cost(i), -i))\n"),
    ("sizing rule", "values = [(1 + float(b[n - 1])) / verify_cost(n) for n in range(1, len(b) + 1)]\n"),
    ("sizing rule", "for d in range(1, m + 1):\n    best = max(best, e / (verify(d) + d * c))\n"),
    ("cost fallback", "verify = verify_cost or (lambda d: 1.0 + VERIFY_TOKEN_COST * d)\n"),
    ("default token cost", "class D:\n    DEFAULT_TOKEN_COST = 0.2\n"),
    ("default token cost", "verify = verify_cost or (lambda d: 1.0 + 0.2 * d)\n"),
    ("default token cost", "def calibrate(ids, token_cost=0.2):\n    pass\n"),
    ("cost fallback", "if self.token_cost is None and ctx.verify_cost is not None:\n    pass\n"),
    ("running rate", "old = [a * self._DECAY + x, b * self._DECAY + y]\n"),
    ("running rate", "d = self.calibration_decay\nself._accepted = d * self._accepted + n\n"),
    ("running rate", "d, old = self.decay, self.stats[j]\nself.stats[j] = [old[0] * d + a, old[1] * d]\n"),
])
def test_the_markers_catch_the_copies_they_replaced(kind, source):
    """The scan above must be able to fail: each marker fires on a pattern it guards against."""
    assert kind in {k for k, _ in copies_in(ast.parse(source))}
