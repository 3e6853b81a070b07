"""Training: self-distilled data (batched with refilled rows, resumable), the Medusa recipe under accelerate, resume,
the CLI, and a 2-process CPU run. A tiny Llama and a WordLevel tokenizer with a chat template
are written to disk, so the whole path (load_model, chat template, batched greedy) runs offline."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_prompt, reference, run, tiny_model
from helpers import MEDUSA_RECIPE, NUM_PROMPTS, data_args, read_log, train_args, write_prompts, write_target
from specdec.drafters.medusa import Medusa
from specdec.models import load_model
from specdec.training import data as data_module
from specdec.training.cli import main
from specdec.training.data import load_examples, make_data
from specdec.training.medusa import MedusaArguments, MedusaRecipe
from specdec.training.prompts import MakePromptsArguments, make_prompts, user_prefix
from specdec.training.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    write_target(root / "tiny-target")
    write_prompts(root / "prompts.jsonl", NUM_PROMPTS + 2, seed=0, ids=True)
    return root


@pytest.fixture(scope="module")
def dataset(workdir):
    make_data(data_args(workdir, "data"))
    return workdir / "data"


def test_make_data_answers_like_unbatched_greedy(workdir, dataset):
    ds = load_examples(dataset)
    assert ds.num_rows == NUM_PROMPTS and set(ds.column_names) == {"input_ids", "prompt_length", "hidden_states"}
    model, tok = load_model(str(workdir / "tiny-target"))
    prompts = data_module.read_prompts(workdir / "prompts.jsonl", "prompt", NUM_PROMPTS)
    for row, prompt in zip(ds, prompts):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        assert row["input_ids"][: row["prompt_length"]].tolist() == ids[0].tolist()
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=0)[0]
        answer = ref[ids.shape[1]:].tolist()
        if 3 in answer:  # the answer ends at EOS, kept
            answer = answer[: answer.index(3) + 1]
        assert row["input_ids"][row["prompt_length"]:].tolist() == answer
        states = model.get_decoder()(input_ids=row["input_ids"][None]).last_hidden_state[0]
        assert row["hidden_states"].shape == states.shape
        assert torch.allclose(row["hidden_states"].float(), states, atol=1e-2)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["done"] and manifest["examples"] == NUM_PROMPTS and manifest["answer_tokens"] > 0


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_greedy_refills_rows_with_per_prompt_generate_answers(arch, attn):
    """9 prompts on 3 rows: rows that stop at EOS (some at their first token) take the next prompt,
    the last ones drain on fewer rows; every answer is that prompt's own greedy `generate`."""
    model = copy.deepcopy(tiny_model(arch, attn=attn))
    prompts = [random_prompt(seed, 3 + 2 * seed % 9) for seed in range(9)]
    free = [reference(model, p, 12)[0, p.shape[1]:].tolist() for p in prompts]
    eos = max({a[0] for a in free}, key=lambda t: sum(t in a for a in free))  # a first token many answers hold
    model.generation_config.eos_token_id = eos
    want = {i: reference(model, p, 12, eos_token_id=eos)[0, p.shape[1]:].tolist() for i, p in enumerate(prompts)}
    lengths = sorted(len(a) for a in want.values())
    assert lengths[0] == 1 and any(1 < n < 12 for n in lengths) and lengths[-1] == 12, lengths  # the cases tested
    got = dict(data_module._greedy(model, [p[0].tolist() for p in prompts], 12, rows=3))
    assert got == want
    assert dict(data_module._greedy(model, [p[0].tolist() for p in prompts], 1, rows=2)) == {
        i: a[:1] for i, a in want.items()}


def test_make_data_resumes_after_a_crash(workdir, dataset, monkeypatch):
    real, calls = data_module._shard_rows, []

    def crash_on_second(model, prompts, answers, args, layers=(-1,)):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, prompts, answers, args, layers)

    monkeypatch.setattr(data_module, "_shard_rows", crash_on_second)
    with pytest.raises(KeyboardInterrupt):  # other batch sizes than `dataset`'s: rows refill across shards
        make_data(data_args(workdir, "resumed", batch_size=3))
    manifest = json.loads((workdir / "resumed" / "manifest.json").read_text())
    assert [s["end"] for s in manifest["shards"]] == [4] and not manifest["done"]
    with pytest.raises(ValueError, match="unfinished"):
        load_examples(workdir / "resumed")
    calls.clear()
    monkeypatch.setattr(data_module, "_shard_rows", real)
    make_data(data_args(workdir, "resumed", batch_size=5))
    again, full = load_examples(workdir / "resumed"), load_examples(dataset)
    assert [r.tolist() for r in again["input_ids"]] == [r.tolist() for r in full["input_ids"]]
    with pytest.raises(ValueError, match="max_new_tokens differ"):
        make_data(data_args(workdir, "resumed", max_new_tokens=8))


@pytest.fixture(scope="module")
def trained(workdir, dataset):
    return train(train_args(workdir, dataset, "run"), MedusaRecipe(MEDUSA_RECIPE))


def test_training_lowers_the_loss_and_saves_a_loadable_drafter(workdir, trained):
    log = read_log(workdir / "run")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    model, _ = load_model(str(workdir / "tiny-target"))
    drafter = Medusa.from_pretrained(trained, model)
    meta = drafter.metadata
    assert meta["training"]["steps"] == 12 and meta["training"]["seconds"] > 0
    assert meta["training"]["train_examples"] == 8 and meta["training"]["eval_examples"] == 2
    assert meta["training"]["train_answer_tokens"] > 0 and meta["training"]["data"]["examples"] == NUM_PROMPTS
    assert drafter.accuracy.shape == (3, 5) and len(meta["eval"]["top1"]) == 3 and "top5" in meta["eval"]
    assert meta["eval"]["expected_tokens_per_step"] >= 1.0
    assert log[-1]["eval"] == meta["eval"]
    assert sorted(p.name for p in (workdir / "run" / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]


def test_draft_vocab_command_gives_medusa_heads_one(workdir, dataset, trained, capsys):
    """`specdec train draft-vocab` on Medusa heads: the split's most frequent answer tokens, saved
    and loaded with the heads, drafts only from them and the context, output exact."""
    out = workdir / "run-vocab"
    assert main(["draft-vocab", "--model", str(workdir / "tiny-target"), "--drafter", str(trained), "--data",
                 str(dataset), "--size", "6", "--output-dir", str(out)]) == 0
    model, _ = load_model(str(workdir / "tiny-target"))
    drafter = Medusa.from_pretrained(out, model)
    assert drafter.draft_vocab.numel() == 6 and drafter.metadata["draft_vocab"]["size"] == 6
    assert drafter.metadata["training"]["steps"] == 12 and drafter.accuracy is not None  # the training record stays
    prompt = torch.tensor([[2, 4, 10, 3, 2, 5]])
    output, stats = run(model, prompt, drafter, 16)
    assert torch.equal(output, reference(model, prompt, 16))
    t = prompt.shape[1]
    for step in stats.steps:
        assert set(step.tree.tokens.tolist()) <= set(drafter.draft_vocab.tolist()) | set(output[0, :t].tolist())
        t += len(step.new_tokens)
    capsys.readouterr()
    assert main(["draft-vocab", "--model", str(workdir / "tiny-target"), "--drafter", str(trained), "--data",
                 str(dataset), "--size", "0", "--output-dir", str(workdir / "run-vocab-0")]) == 2
    assert "specdec: error: draft-vocab: --size must be >= 1" in capsys.readouterr().err


def test_resume_continues_exactly(workdir, dataset, trained):
    with pytest.raises(ValueError, match="--resume"):
        train(train_args(workdir, dataset, "run"), MedusaRecipe(MEDUSA_RECIPE))
    # Interrupted after step 8 (its newest checkpoint), then resumed to 12.
    partial = train(train_args(workdir, dataset, "part", max_steps=8), MedusaRecipe(MEDUSA_RECIPE))
    assert read_log(workdir / "part")[-2]["step"] == 8
    resumed = train(train_args(workdir, dataset, "part", resume=True), MedusaRecipe(MEDUSA_RECIPE))
    log = [r for r in read_log(workdir / "part") if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, 13))  # the first run's eval record was dropped
    straight = [r for r in read_log(workdir / "run") if "loss" in r]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
    a, b = load_file(str(trained / "drafter.safetensors")), load_file(str(resumed / "drafter.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert partial == resumed


def test_medusa2_joint_training_ships_its_adapted_target(workdir, dataset, tmp_path):
    from specdec.drafters import checkpoint
    from specdec.drafters.medusa import adapted_target

    args = MedusaArguments(num_heads=2, eval_topk=3, tree_budget=6, joint=True, lora_rank=4, base_weight=0.5)
    directory = train(train_args(workdir, dataset, "medusa2", max_steps=6, learning_rate=1e-2), MedusaRecipe(args))
    log = [r for r in read_log(workdir / "medusa2") if "loss" in r]
    assert len(log) == 6 and all(r["loss_kl"] >= 0 for r in log) and log[0]["loss_kl"] == pytest.approx(0, abs=1e-6)
    model, _ = load_model(str(workdir / "tiny-target"))
    before = checkpoint.fingerprint(model)
    with pytest.raises(checkpoint.CheckpointError, match="adapted_target"):
        Medusa.from_pretrained(directory, model)  # the heads read the adapted decoder's states
    adapted = adapted_target(directory, model)
    assert checkpoint.fingerprint(model) == before  # the original is untouched
    drafter = Medusa.from_pretrained(directory, adapted)
    meta = drafter.metadata["eval"]
    assert 0 <= meta["original_top1_agreement"] <= 1 and meta["kl_to_original"] >= 0
    prompt = torch.tensor([[2, 4, 10, 11, 12, 3, 2, 5]])
    assert torch.equal(run(adapted, prompt, drafter, 20)[0], reference(adapted, prompt, 20))
    saved = load_file(str(drafter.save_pretrained(tmp_path / "again") / "drafter.safetensors"))
    assert any(k.startswith("backbone_lora.") for k in saved) and any(k.startswith("blocks.") for k in saved)
    # draft-vocab reads a Medusa-2 checkpoint with its adapted target and keeps the adapter.
    assert main(["draft-vocab", "--model", str(workdir / "tiny-target"), "--drafter", str(directory), "--data",
                 str(dataset), "--size", "6", "--output-dir", str(tmp_path / "vocab")]) == 0
    with_vocab = Medusa.from_pretrained(tmp_path / "vocab", adapted_target(tmp_path / "vocab", model))
    assert with_vocab.draft_vocab.numel() == 6 and with_vocab.backbone_lora.keys() == drafter.backbone_lora.keys()
    plain = train(train_args(workdir, dataset, "medusa1-small", max_steps=1), MedusaRecipe(MEDUSA_RECIPE))
    with pytest.raises(checkpoint.CheckpointError, match="Medusa-1"):
        adapted_target(plain, model)


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_bf16_mixed_precision_trains(workdir, dataset, kind):
    from specdec.training.eagle import EagleArguments, EagleRecipe

    recipe = MedusaRecipe(MEDUSA_RECIPE) if kind == "medusa" else EagleRecipe(EagleArguments(unroll=2, eval_depth=2))
    train(train_args(workdir, dataset, f"bf16-{kind}", max_steps=8, mixed_precision="bf16"), recipe)
    losses = [r["loss"] for r in read_log(workdir / f"bf16-{kind}") if "loss" in r]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])
    with pytest.raises(ValueError, match="--mixed-precision"):
        train(train_args(workdir, dataset, "bf16-bad", mixed_precision="int8"), recipe)


def test_cli_help_and_run(workdir, dataset, capsys):
    for command, fields in (("make-data", ["--max_new_tokens", "--save_hidden_states", "--limit", "--field"]),
                            ("medusa", ["--num_heads", "--decay", "--resume", "--save_steps", "--seed"])):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(f in text for f in fields)
    assert main([]) == 2 and main(["nope"]) == 2
    out = workdir / "cli"
    assert main(["medusa", "--model", str(workdir / "tiny-target"), "--data", str(dataset), "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--num-heads", "2", "--save-steps", "2"]) == 0
    meta = json.loads((out / "drafter" / "drafter_config.json").read_text())["metadata"]
    assert meta["training"]["command"].startswith("specdec train medusa --model")


@pytest.mark.slow
def test_accelerate_two_processes(workdir, dataset):
    out = workdir / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "specdec.training",
           "medusa", "--model", str(workdir / "tiny-target"), "--data", str(dataset), "--output-dir", str(out),
           "--max-steps", "3", "--batch-size", "2", "--num-heads", "2", "--save-steps", "2", "--log-steps", "1"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "drafter" / "drafter_config.json").read_text())["metadata"]
    assert meta["training"]["processes"] == 2 and meta["training"]["steps"] == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert {p.name for p in (out / "checkpoints" / "step-00000003").iterdir()} >= {"random_states_0.pkl",
                                                                                    "random_states_1.pkl"}


def test_make_prompts_keeps_ended_distinct_user_messages(workdir, capsys):
    """Magpie: the model writes user messages from its template's user header; reproducible by seed,
    and the file feeds make-data."""
    from dataclasses import replace
    from types import SimpleNamespace

    tok = load_model(str(workdir / "tiny-target"))[1]
    assert user_prefix(tok) == "<|im_start|> user "
    args = MakePromptsArguments(model=str(workdir / "tiny-target"), output=str(workdir / "magpie.jsonl"), num_prompts=5,
                                max_new_tokens=48, temperature=3.0, min_chars=1, batch_size=8)
    path = make_prompts(args)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    texts = [r["prompt"] for r in rows]
    assert 1 <= len(rows) <= 5 and all(set(r) == {"prompt"} and r["prompt"].strip() for r in rows)
    assert len(set(texts)) == len(texts) and not any("<|im" in t for t in texts)  # the turn's end is cut off
    assert "make-prompts: kept" in capsys.readouterr().out
    again = make_prompts(replace(args, output=str(workdir / "magpie-again.jsonl")))
    assert again.read_text() == path.read_text()
    data = make_data(
        replace(data_args(workdir, "data-magpie", limit=None, save_hidden_states=False), prompts=str(path))
    )
    assert len(load_examples(data)) == len(rows)
    with pytest.raises(ValueError, match="none of 8 samples ended"):  # one new token: at best an empty message
        make_prompts(replace(args, output=str(workdir / "none.jsonl"), max_new_tokens=1, max_batches=1))
    assert not (workdir / "none.jsonl").exists()
    with pytest.raises(ValueError, match="no chat template"):
        user_prefix(SimpleNamespace(chat_template=None))
    with pytest.raises(ValueError, match="--temperature > 0"):
        make_prompts(replace(args, temperature=0))
    with pytest.raises(SystemExit) as exit_info:
        main(["make-prompts", "--help"])
    assert exit_info.value.code == 0 and "--num_prompts" in capsys.readouterr().out

