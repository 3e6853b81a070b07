"""Drafter names at the edge: ``name[opt,key=value]``, composed with + and |, and bench's :variant after them."""

from __future__ import annotations

import pytest

from conftest import tiny_model
from specdec import registry
from specdec.bench import BenchConfig, check_methods, make_drafters
from specdec.drafters import EarlyExit, Fallback, Jacobi, Merge, PromptLookup, TokenRecycling
from specdec.registry import Resources, check_name, make_drafter, parse_name


@pytest.fixture
def loads(monkeypatch):
    """Replaces the shipped-drafter loader: records (kind, kwargs) and returns a PromptLookup."""
    calls = []

    def load(kind, model, **kwargs):
        calls.append((kind, kwargs))
        return PromptLookup()

    monkeypatch.setattr(registry, "load", load)
    return calls


def test_parse_name_reads_flags_and_values():
    assert parse_name("eagle") == ("eagle", {})
    assert parse_name("eagle[full-vocab]") == ("eagle", {"full_vocab": True})
    assert parse_name("early-exit[untrained, budget=8]") == ("early-exit", {"untrained": True, "budget": 8})
    assert parse_name("prompt-lookup-tree[budget=32]") == ("prompt-lookup-tree", {"budget": 32})


def test_options_reach_the_drafter(loads):
    make_drafter("eagle[full-vocab]", Resources(None))
    make_drafter("medusa[full-vocab,budget=12]", Resources(None))
    make_drafter("eagle", Resources(None))
    make_drafter("eagle3[dir=runs/e3/drafter,budget=8]+prompt-lookup", Resources(None))
    make_drafter("early-exit[dir=x]", Resources(None))
    assert loads == [("eagle", {"draft_vocab": None}), ("medusa", {"draft_vocab": None, "budget": 12}), ("eagle", {}),
                     ("eagle3", {"directory": "runs/e3/drafter", "budget": 8}), ("early-exit", {"directory": "x"})]
    with pytest.raises(ValueError, match="unknown option 'full-vocab'"):
        make_drafter("eagle3[full-vocab]", Resources(None))
    tree = make_drafter("prompt-lookup-tree[budget=5]", Resources(None))
    assert (tree.num_matches, tree.budget) == (3, 5)  # the entry's other settings stay
    assert make_drafter("prompt-lookup-tree", Resources(None)).budget == 16


def test_sizing_and_scheme_options():
    fixed = make_drafter("prompt-lookup[fixed,max-ngram=2]", Resources(None))
    assert (fixed.token_cost, fixed.max_ngram) == (0.0, 2)  # HF's fixed length and n-gram size
    assert make_drafter("prompt-lookup", Resources(None)).token_cost is None
    q = make_drafter("quantized-self[scheme=int8,fixed]", Resources(None))
    assert q.scheme == "int8" and q._options["sized"] is False
    assert make_drafter("quantized-self", Resources(None)).scheme == "int8-smooth"
    draft = tiny_model(seed=3)
    assert make_drafter("draft-model[fixed]", Resources(None, draft=draft)).sized is False
    with pytest.raises(ValueError, match=r"draft-model\[quantized\] needs the draft model's int8 copy"):
        make_drafter("draft-model[quantized]", Resources(None, draft=draft))


def test_early_exit_untrained_needs_no_checkpoint():
    model = tiny_model()
    drafter = make_drafter("early-exit[untrained]", Resources(model))
    assert isinstance(drafter, EarlyExit) and drafter.adapter is None
    with pytest.raises(Exception, match="early-exit"):  # nothing is shipped for the tiny model
        make_drafter("early-exit", Resources(model))


def test_names_with_options_compose(loads):
    drafter = make_drafter("eagle[full-vocab]+prompt-lookup[budget=4]|jacobi", Resources(None))
    assert isinstance(drafter, Fallback) and isinstance(drafter.primary, Merge)
    assert isinstance(drafter.secondary, Jacobi)
    assert [d.budget for d in drafter.primary.drafters] == [None, 4]
    assert loads == [("eagle", {"draft_vocab": None})]
    drafter = make_drafter("prompt-lookup+token-recycling|jacobi", Resources(None))
    assert [type(d) for d in drafter.primary.drafters] == [PromptLookup, TokenRecycling]


def test_bench_variant_follows_the_options(loads):
    cfg = BenchConfig(methods="baseline,eagle[full-vocab]:noguard,medusa[full-vocab]+prompt-lookup:stock")
    assert check_methods(cfg) == ["baseline", "eagle[full-vocab]:noguard", "medusa[full-vocab]+prompt-lookup:stock"]
    assert set(make_drafters(cfg, None, None)) == {
        "eagle[full-vocab]:noguard",
        "medusa[full-vocab]+prompt-lookup:stock",
    }
    assert loads == [("eagle", {"draft_vocab": None}), ("medusa", {"draft_vocab": None})]
    with pytest.raises(ValueError, match=r"--methods: .*unknown option 'nope'.*full-vocab, budget"):
        check_methods(BenchConfig(methods="baseline,eagle[nope]:noguard"))


@pytest.mark.parametrize(
    "name, complaint",
    [
        ("eagle[nope]", r"drafter 'eagle\[nope\]': unknown option 'nope'; the options are dir, full-vocab, budget"),
        ("jacobi[full-vocab]", r"unknown option 'full-vocab'; it takes no options"),
        ("eagle[full-vocab=1]", r"option 'full-vocab' is a flag and takes no value"),
        ("eagle[budget]", r"option 'budget' needs a value \(budget=\.\.\.\)"),
        ("eagle[budget=0]", r"budget takes an int >= 1 .*got '0'"),
        ("eagle[budget=4,budget=5]", r"option 'budget' is given twice"),
        ("eagle[full-vocab", r"'eagle\[full-vocab' is not NAME or NAME\[option,key=value\]"),
        ("eagle-full-vocab", r"unknown drafter 'eagle-full-vocab'; choose from .*eagle"),  # the old A/B names are gone
        ("early-exit-untrained", r"unknown drafter 'early-exit-untrained'"),
        ("prompt-lookup+nope", r"unknown drafter 'nope'.* \(in 'prompt-lookup\+nope'\)"),
        ("jacobi|eagle[x]", r"unknown option 'x'.* \(in 'jacobi\|eagle\[x\]'\)"),
        ("prompt-lookup[max-ngram=0]", r"takes an int >= 1, got '0'"),
        ("quantized-self[scheme=int4]", r"unknown scheme 'int4'; choose from int8"),
    ],
)
def test_bad_names_are_refused_naming_the_fix(name, complaint):
    with pytest.raises(ValueError, match=complaint):
        check_name(name)
    with pytest.raises(ValueError, match=complaint):
        make_drafter(name, Resources(None))


@pytest.mark.parametrize("argv", [["generate", "--drafter", "eagle[ful-vocab]", "hi"],
                                  ["bench", "--methods", "baseline,eagle[ful-vocab]:noguard"]])
def test_cli_refuses_a_bad_option_before_loading(argv, capsys, monkeypatch):
    import specdec.models
    from specdec import cli

    monkeypatch.setattr(specdec.models, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specdec: error: ") and "\n" not in err
    assert "unknown option 'ful-vocab'; the options are dir, full-vocab, budget" in err


def test_shipped_drafters_fit_pypi_and_are_bf16():
    """PyPI refuses files over 100 MB; shipped weights are bf16 (cast to the target's dtype on load)."""
    from safetensors import safe_open

    from specdec.drafters import checkpoint

    files = sorted(checkpoint.SHIPPED_DIR.glob("*/*/*"))
    assert any(f.name == checkpoint.WEIGHTS_NAME for f in files)
    for f in files:
        assert f.stat().st_size < 100 * 10**6, f"{f}: {f.stat().st_size / 1e6:.1f} MB, over PyPI's per-file limit"
        if f.name == checkpoint.WEIGHTS_NAME:
            with safe_open(str(f), "pt") as weights:
                dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
            assert not dtypes & {"F32", "F64", "F16"}, f"{f}: {dtypes}"
