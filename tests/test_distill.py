"""Training the early-exit adapter and distilling a draft model under the shared accelerate loop:
loss finite and falling, resume, the saved drafters load and stay exact, the CLI. Uses the tiny
on-disk target and tokenizer of test_training (`write_target`) plus a smaller draft sharing its
tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from conftest import random_prompt, reference, run
from helpers import write_prompts, write_target
from specdec.cli import main as specdec_main
from specdec.drafters import DraftModel
from specdec.drafters.early_exit import EarlyExit
from specdec.drafters.layer_view import LayerSubset
from specdec.models import load_model
from specdec.training.data import MakeDataArguments, load_examples, make_data, split
from specdec.training.draft_model import REPORT, DraftModelArguments, DraftModelRecipe
from specdec.training.early_exit import EarlyExitArguments, EarlyExitRecipe
from specdec.training.train import TrainArguments, train

NUM_PROMPTS = 10


def write_draft(target_dir: Path, directory: Path) -> None:
    """One narrow layer, tied embeddings, the target's tokenizer (so the same vocabulary)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(target_dir)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=3, bos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    write_target(root / "tiny-target")
    write_draft(root / "tiny-target", root / "tiny-draft")
    write_prompts(root / "prompts.jsonl", NUM_PROMPTS, seed=1)
    make_data(MakeDataArguments(model=str(root / "tiny-target"), prompts=str(root / "prompts.jsonl"),
                                output_dir=str(root / "data"), max_new_tokens=16, batch_size=5, shard_size=10))
    return root


def train_args(workdir: Path, out: str, **kw) -> TrainArguments:
    # batch_size 8 = every training example: each step sees the same batch, so the loss falls smoothly
    kw = {"max_steps": 10, "batch_size": 8, "learning_rate": 3e-2, "log_steps": 1, "save_steps": 5,
          "eval_fraction": 0.2, "lr_scheduler": "constant", **kw}
    return TrainArguments(model=str(workdir / "tiny-target"), data=str(workdir / "data"),
                          output_dir=str(workdir / out), **kw)


def losses(directory: Path) -> list[float]:
    records = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def assert_falls(values: list[float], by: float) -> None:
    assert all(torch.isfinite(torch.tensor(values)))
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3 - by, values


EXIT = EarlyExitArguments(exit_layer=1, rank=8)


@pytest.fixture(scope="module")
def exit_run(workdir):
    return train(train_args(workdir, "exit"), EarlyExitRecipe(EXIT))


def test_early_exit_training_learns_and_saves_a_loadable_exact_drafter(workdir, exit_run):
    assert_falls(losses(workdir / "exit"), 0.3)
    model, _ = load_model(str(workdir / "tiny-target"), dtype=torch.float64)
    drafter = EarlyExit.from_pretrained(exit_run, model, min_confidence=0.0)
    assert drafter.exit_layer == 1 and drafter.adapter.rank == 8
    meta = drafter.metadata
    assert meta["training"]["steps"] == 10 and meta["training"]["seconds"] > 0
    assert meta["training"]["train_examples"] == 8 and meta["training"]["train_answer_tokens"] > 0
    assert meta["training"]["data"]["examples"] == NUM_PROMPTS
    assert drafter.adapter.up.weight.abs().max() > 0  # it moved off the plain exit
    # the stored held-out agreement, recomputed here from the adapter's plain definition
    head, norm = model.get_output_embeddings(), model.get_decoder().norm
    states, labels = held_out(workdir, lambda ids: LayerSubset(model, [0])(ids, torch.arange(ids.numel()),
                                                                           return_states=True).states[1])
    plain = head(norm(states)).argmax(-1)
    adapted = head(drafter.adapter(norm(states))).argmax(-1)
    ev = meta["eval"]
    assert ev["positions"] == labels.numel() > 0 and ev["exit_layer"] == 1
    assert ev["top1_without_adapter"] == pytest.approx(float((plain == labels).double().mean()))
    assert ev["top1"] == pytest.approx(float((adapted == labels).double().mean()))
    prompt = random_prompt(4, 10, vocab=96)
    out, stats = run(model, prompt, drafter, 20)
    assert torch.equal(out, reference(model, prompt, 20))
    assert stats.mean_accepted > 1.0


def held_out(workdir: Path, forward) -> tuple[Tensor, Tensor]:
    """`forward(ids [t]) -> [t, ...]` at every held-out position whose next token is an answer
    token, one example at a time, with those next tokens ([n])."""
    ds = load_examples(workdir / "data")
    _, held = split(len(ds), 0.2, 0)
    outs, labels = [], []
    with torch.no_grad():
        for i in held.tolist():
            ids, start = ds[i]["input_ids"].long(), int(ds[i]["prompt_length"])
            outs.append(forward(ids)[start - 1 : -1])
            labels.append(ids[start:])
    return torch.cat(outs), torch.cat(labels)


def test_early_exit_resume_continues_exactly(workdir, exit_run):
    train(train_args(workdir, "exit-part", max_steps=5), EarlyExitRecipe(EXIT))
    resumed = train(train_args(workdir, "exit-part", resume=True), EarlyExitRecipe(EXIT))
    assert losses(workdir / "exit-part") == pytest.approx(losses(workdir / "exit"), rel=1e-5)
    a, b = load_file(str(exit_run / "drafter.safetensors")), load_file(str(resumed / "drafter.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_early_exit_kl_term(workdir):
    out = train(train_args(workdir, "exit-kl", max_steps=2, save_steps=2),
                EarlyExitRecipe(EarlyExitArguments(exit_layer=1, rank=4, kl_weight=0.5)))
    records = [json.loads(line) for line in (workdir / "exit-kl" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["kl"] > 0 and r["loss"] == pytest.approx(r["ce"] + 0.5 * r["kl"], rel=1e-4) for r in steps)
    assert (out / "drafter_config.json").is_file()


def test_recipe_arguments_are_validated():
    for kwargs, word in [
        (dict(exit_layer=0), "exit-layer"),
        (dict(rank=0), "rank"),
        (dict(kl_weight=-1.0), "kl-weight"),
    ]:
        with pytest.raises(ValueError, match=word):
            EarlyExitRecipe(EarlyExitArguments(**kwargs))
    for kwargs, word in [(dict(temperature=0.0), "temperature"), (dict(ce_weight=-1.0), "ce-weight"),
                         (dict(lora=True, lora_rank=0), "lora-rank"), (dict(save_dtype="int8"), "save-dtype")]:
        with pytest.raises(ValueError, match=word):
            DraftModelRecipe(DraftModelArguments(draft="x", **kwargs))


def draft_args(workdir: Path, **kw) -> DraftModelArguments:
    return DraftModelArguments(draft=str(workdir / "tiny-draft"), **kw)


@pytest.fixture(scope="module")
def distilled(workdir):
    return train(train_args(workdir, "draft", learning_rate=1e-2), DraftModelRecipe(draft_args(workdir, ce_weight=0.1)))


def test_distillation_lowers_the_loss_and_saves_a_usable_draft_model(workdir, distilled):
    assert_falls(losses(workdir / "draft"), 0.2)
    report = json.loads((distilled / REPORT).read_text())
    ev = report["eval"]
    assert set(ev) == {"positions", "before", "after"}
    assert report["training"]["steps"] == 10 and report["training"]["arguments"]["ce_weight"] == 0.1
    assert report["draft"] == str(workdir / "tiny-draft")
    assert not list(workdir.glob("draft/.drafter.*"))  # no staging directory left behind
    target, _ = load_model(str(workdir / "tiny-target"), dtype=torch.float64)
    draft, tok = load_model(str(distilled), dtype=torch.float64)
    assert len(tok) == len(load_model(str(workdir / "tiny-draft"))[1])
    before, _ = load_model(str(workdir / "tiny-draft"), dtype=torch.float64)
    changed = [n for n, p in draft.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])]
    assert len(changed) == len(list(draft.parameters()))  # a full fine-tune moves every weight
    # the stored held-out agreement and KL, recomputed here example by example
    t_logits, _ = held_out(workdir, lambda ids: target(input_ids=ids[None]).logits[0])
    for name, model in (("before", before), ("after", draft)):
        d_logits, _ = held_out(workdir, lambda ids: model(input_ids=ids[None]).logits[0])
        assert ev["positions"] == d_logits.shape[0] > 0
        top1 = float((d_logits.argmax(-1) == t_logits.argmax(-1)).double().mean())
        kl = float(torch.nn.functional.kl_div(d_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True,
                                              reduction="batchmean"))
        assert ev[name]["top1"] == pytest.approx(top1) and ev[name]["kl"] == pytest.approx(kl, rel=1e-4), name
    prompt = random_prompt(5, 10, vocab=96)
    out, _ = run(target, prompt, DraftModel(draft, num_tokens=3), 20)
    assert torch.equal(out, reference(target, prompt, 20))


def test_lora_distillation_resumes_and_merges(workdir):
    args = draft_args(workdir, lora=True, lora_rank=4)
    straight = train(train_args(workdir, "lora", max_steps=6, save_steps=3), DraftModelRecipe(args))
    train(train_args(workdir, "lora-part", max_steps=3, save_steps=3), DraftModelRecipe(args))
    resumed = train(train_args(workdir, "lora-part", max_steps=6, save_steps=3, resume=True), DraftModelRecipe(args))
    assert losses(workdir / "lora-part") == pytest.approx(losses(workdir / "lora"), rel=1e-5)
    assert losses(workdir / "lora")[-1] < losses(workdir / "lora")[0]
    a, _ = load_model(str(straight))
    b, _ = load_model(str(resumed))
    assert not any("lora" in n for n, _ in a.named_parameters())  # merged: an ordinary model
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    before, _ = load_model(str(workdir / "tiny-draft"))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), before.parameters()))


def test_main_cli_dispatches_train(workdir, capsys):
    assert specdec_main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "early-exit" in text and "draft-model" in text
    for command, fields in (("early-exit", ["--exit_layer", "--rank", "--kl_weight", "--max_steps"]),
                            ("draft-model", ["--draft", "--lora", "--lora_rank", "--temperature", "--resume"])):
        with pytest.raises(SystemExit) as exit_info:
            specdec_main(["train", command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(f in text for f in fields), command
    with pytest.raises(SystemExit) as exit_info:
        specdec_main(["--help"])
    assert exit_info.value.code == 0 and "train" in capsys.readouterr().out
    out = workdir / "cli"
    assert specdec_main(["train", "early-exit", "--model", str(workdir / "tiny-target"), "--data",
                         str(workdir / "data"), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
                         "--exit-layer", "1", "--rank", "4", "--save-steps", "2"]) == 0
    meta = json.loads((out / "drafter" / "drafter_config.json").read_text())["metadata"]
    assert meta["training"]["command"].startswith("specdec train early-exit --model")
    assert meta["training"]["arguments"]["rank"] == 4
