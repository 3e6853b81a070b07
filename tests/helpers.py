"""Helpers shared by several test files (test files never import each other): the CLI's tokenizer, the tiny training
target and its data, random Medusa/Eagle heads, and checks shared by drafters of one family."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import random_prompt, reference, run
from specdec.drafters.checkpoint import CheckpointError
from specdec.drafters.eagle import EagleHead
from specdec.drafters.medusa import MedusaHeads
from specdec.training.data import MakeDataArguments
from specdec.training.medusa import MedusaArguments
from specdec.training.train import TrainArguments

# ---- the CLI: a tokenizer for the tiny random models -------------------------------------------


class WordTokenizer:
    """Enough of a tokenizer for the CLI: a token id per character, decoded as one word each."""

    chats = 0  # apply_chat_template calls

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        WordTokenizer.chats += 1
        return " ".join(m["content"] for m in messages) + " >"

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        class Out:
            input_ids = [ord(c) % 90 for c in text]

        if return_tensors == "pt":
            Out.input_ids = torch.tensor([Out.input_ids])
        return Out()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"w{int(i)} " for i in ids)


# ---- training: a tiny target on disk, its prompts and arguments -------------------------------


NUM_PROMPTS = 10


def write_target(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"] + [f"w{i}" for i in range(90)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor "
                         "%}"
                         "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    torch.manual_seed(0)
    # A wide init makes the random model's next token confident (and its text repetitive), so
    # the heads have something to learn in a few steps.
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, eos_token_id=3, bos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)


def write_prompts(path: Path, n: int, seed: int, ids: bool = False) -> None:
    """`n` prompts of 2 to 8 random words of `write_target`'s vocabulary, one JSON line each
    (with an "id" field too if `ids`)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = torch.randint(0, 90, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
            row = {"id": i} if ids else {}
            f.write(json.dumps({**row, "prompt": " ".join(f"w{int(w)}" for w in words)}) + "\n")


def data_args(workdir: Path, out: str, **kw) -> MakeDataArguments:
    kw = {
        "max_new_tokens": 16,
        "limit": NUM_PROMPTS,
        "batch_size": 4,
        "shard_size": 4,
        "save_hidden_states": True,
        **kw,
    }
    return MakeDataArguments(model=str(workdir / "tiny-target"), prompts=str(workdir / "prompts.jsonl"),
                             output_dir=str(workdir / out), **kw)


def train_args(workdir: Path, dataset: Path, out: str, **kw) -> TrainArguments:
    kw = {"max_steps": 12, "batch_size": 2, "learning_rate": 3e-2, "log_steps": 1, "save_steps": 4,
          "eval_fraction": 0.2, "lr_scheduler": "constant", **kw}
    return TrainArguments(model=str(workdir / "tiny-target"), data=str(dataset), output_dir=str(workdir / out), **kw)


MEDUSA_RECIPE = MedusaArguments(num_heads=3, eval_topk=5, tree_budget=8)


def read_log(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]


# ---- Medusa and Eagle heads ---------------------------------------------------------------------


K = 3


def random_heads(model, seed: int, num_heads: int = K, own: bool = False) -> MedusaHeads:
    torch.manual_seed(seed)
    vocab = model.config.vocab_size if own else None
    heads = MedusaHeads(model.config.hidden_size, num_heads, num_layers=2, vocab_size=vocab)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return heads.to(device=model.device, dtype=model.dtype)


def assert_drafts_from_the_second_step(model, drafter) -> None:
    """A one-token prompt: a drafter reading the target's hidden states has none before the first
    verification, so it drafts nothing on the first step and something on the second; exact."""
    prompt = random_prompt(2, 1)
    out, stats = run(model, prompt, drafter, 12)
    assert torch.equal(out, reference(model, prompt, 12))
    assert len(stats.steps[0].tree) == 0 and len(stats.steps[1].tree) > 0


def named_model(name: str, hidden: int = 32, vocab: int = 96, layers: int = 2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, name_or_path=f"/some/dir/{name}")
    return LlamaForCausalLM(cfg).eval()


def assert_same_drafts(model, drafter, loaded) -> None:
    """`loaded` (`drafter` saved and loaded again) drafts the same trees and gives the same output."""
    prompt = random_prompt(4, 6)
    a, sa = run(model, prompt, drafter, 20)
    b, sb = run(model, prompt, loaded, 20)
    assert torch.equal(a, b)
    for x, y in zip(sa.steps, sb.steps):
        assert torch.equal(x.tree.tokens, y.tree.tokens) and torch.equal(x.tree.parents, y.tree.parents)


def assert_refuses_other_targets(base, load) -> None:
    """`load(model, **kwargs)` reads a checkpoint saved for `base` (``named_model("base-a")``): it
    takes `base`, refuses a model differing in hidden size, vocabulary, layer count or name (naming
    the field), and takes another name with ``check_base_model=False``."""
    load(base)
    cases = [(named_model("base-a", hidden=48), "hidden_size=32"), (named_model("base-a", vocab=100), "vocab_size=96"),
             (named_model("base-a", layers=3), "num_hidden_layers=2"), (named_model("base-b"), "base model 'base-a'")]
    for other, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load(other)
    load(named_model("base-b"), check_base_model=False)


def random_head(model, seed: int) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead.for_target(model)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return head


# ---- layer-view drafters (LayerSkip, EarlyExit) --------------------------------------------------


def assert_drafts_what_the_target_says(model, drafter) -> None:
    """`drafter` (4 tokens deep, no confidence cut-off) drafts the target's own greedy tokens:
    every step drafts as deep as the 23 new tokens leave room for, and all of it is accepted."""
    prompt = random_prompt(6, 7)
    out, stats = run(model, prompt, drafter, 23)
    assert torch.equal(out, reference(model, prompt, 23))
    produced = 0
    for step in stats.steps:
        assert len(step.tree) == min(4, 23 - produced - 1)
        assert step.accepted_nodes == list(range(len(step.tree)))
        produced += len(step.new_tokens)
    assert stats.mean_accepted == 23 / 5  # four steps of 5 tokens, then 3


def identity_layers(model, layers):
    """A copy of `model` whose `layers` add nothing to the residual stream (zero output projections)."""
    model = copy.deepcopy(model)
    for name, param in model.named_parameters():
        if any(f"layers.{i}." in name for i in layers) and ("o_proj" in name or "down_proj" in name):
            param.data.zero_()
    return model


def assert_cache_stays_reconciled(model, drafter, prompt_length: int = 9) -> None:
    """After a run with rejections, a `LayerSubset` drafter's cache holds exactly the tokens it
    says (`drafter.cached`, from position `drafter.start`): one more token fed on it gives a
    fresh forward's logits."""
    _, stats = run(model, random_prompt(4, prompt_length), drafter, 30)
    assert any(len(s.accepted_nodes) < len(s.tree) for s in stats.steps)  # there were rejections
    held, start = drafter.cached, drafter.start
    assert drafter.view.cached(drafter.cache) == held.numel()
    nxt = torch.tensor([3])
    incremental = drafter.view(nxt, torch.tensor([start + held.numel()]), cache=drafter.cache).logits[-1]
    fresh = drafter.view(torch.cat([held, nxt]), torch.arange(start, start + held.numel() + 1)).logits[-1]
    torch.testing.assert_close(incremental, fresh, rtol=0, atol=1e-9)
