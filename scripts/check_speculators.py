"""Cross-check: the speculators layout specdec writes computes, in vLLM's `speculators` package,
the draft logits specdec's `Eagle3Head` computes. Two halves, two interpreters:

    python3 scripts/check_speculators.py write /tmp/specx-check            # specdec's python
    /tmp/spec-venv/bin/python scripts/check_speculators.py compare /tmp/specx-check

`write DIR` builds a tiny float32 Llama target (DIR/verifier, saved with save_pretrained: the
verifier the config names, whose config speculators reads), a random EAGLE-3 head with a
32-token draft vocabulary, exports it to DIR/head in the speculators layout, and stores in
DIR/case.safetensors a token sequence x_0..x_T, random fused states a_0..a_{T-1}, the positions
and the head's one-step causal logits [1, T, 32] for the pairs (a_p, x_{p+1}).
`compare DIR` loads DIR/head with `SpeculatorModel.from_pretrained`, runs one TTT step on the same
pairs (speculators' `shift_batch` alignment: input_ids x_1..x_T beside hidden_states a_0..a_{T-1};
its forward does not shift the first step) and compares its lm_head logits: once per attention
implementation with specdec's positions, once with speculators' own default positions (1 + p,
equal up to rounding: rotary attention sees only position differences), after checking the
loaded embed_tokens is the verifier's (speculators leaves a missing one uninitialised, not NaN,
under transformers 5: the reason the export stores it). Prints one PASS or FAIL
line; exits 1 on FAIL. The `write` half never imports speculators, the `compare` half never
imports specdec (they pin different transformers releases).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, DRAFT_VOCAB, STEPS = 64, 4, 2, 6, 128, 32, 12
AUX_LAYERS = (1, 3, 5)  # distinct: speculators refuses repeated ids (the default for 6 layers is 2, 3, 3)
TOLERANCE = 1e-5


def write(directory: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's specdec, not an installed one
    from transformers import LlamaConfig, LlamaForCausalLM

    import specdec
    from specdec.drafters.eagle3 import Eagle3Head
    from specdec.drafters.eagle3_formats import SPECULATORS, export
    from specdec.drafters.layer_view import causal_mask

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    target = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        target.get_input_embeddings().weight.normal_(0.0, 1.0)  # unit-scale embeddings: the layer norms them
    target.save_pretrained(directory / "verifier")

    draft_ids = torch.sort(torch.randperm(VOCAB)[:DRAFT_VOCAB]).values
    head = Eagle3Head.for_target(target, draft_ids, aux_layers=AUX_LAYERS, intermediate_size=3 * HIDDEN)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    head.eval()
    export(head, directory / "head", SPECULATORS, dtype="float32", verifier=str(directory / "verifier"),
           verifier_architectures=("LlamaForCausalLM",), embedding=target.get_input_embeddings().weight)

    tokens = torch.randint(0, VOCAB, (1, STEPS + 1))
    features = torch.randn(1, STEPS, 3 * HIDDEN)
    positions = torch.arange(STEPS)[None]  # pair p sits at the position of a_p, as specdec's Eagle drafter does
    with torch.no_grad():
        embeds = target.get_input_embeddings()(tokens[:, 1:])
        logits = head.logits(head(features, embeds, positions, causal_mask(0, STEPS, torch.float32)))
    save_file({"tokens": tokens, "features": features, "positions": positions, "logits": logits.contiguous()},
              str(directory / "case.safetensors"))
    print(f"specdec {specdec.__file__}: wrote {directory / 'head'} and {directory / 'case.safetensors'} "
          f"(logits {tuple(logits.shape)}, max |logit| {logits.abs().max().item():.3f})")


def compare(directory: Path) -> int:
    from speculators import SpeculatorModel
    from speculators.models.eagle3 import Eagle3SpeculatorConfig

    case = load_file(str(directory / "case.safetensors"))
    tokens, features, positions, expected = case["tokens"], case["features"], case["positions"], case["logits"]
    embedding = load_file(str(directory / "verifier" / "model.safetensors"))["model.embed_tokens.weight"]
    failures, worst = [], 0.0
    for attn in ("simple_flex_attention", "eager"):
        config = Eagle3SpeculatorConfig.from_pretrained(directory / "head")
        config.transformer_layer_config._attn_implementation = attn
        model = SpeculatorModel.from_pretrained(directory / "head", config=config).eval()
        if not torch.equal(model.embed_tokens.weight, embedding):
            failures.append(f"{attn}: embed_tokens is not the verifier's embedding")
        for label, pos in (("specdec's positions", positions), ("speculators' positions 1 + p", None)):
            captured = []
            hook = model.lm_head.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
            with torch.no_grad():
                model(hidden_states=features, input_ids=tokens[:, 1:], document_ids=torch.zeros_like(tokens[:, 1:]),
                      position_ids=pos, ttt_steps=1)
            hook.remove()
            diff = (captured[0].float() - expected).abs().max().item()
            worst = max(worst, diff)
            same = torch.equal(captured[0].argmax(-1), expected.argmax(-1))
            print(f"{type(model).__name__} [{attn}, {label}]: max |logits - specdec| = {diff:.3e}, "
                  f"argmax {'equal' if same else 'DIFFERS'}")
            if not diff <= TOLERANCE:
                failures.append(f"{attn}, {label}: max diff {diff:.3e} > {TOLERANCE:g}")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print(f"PASS: speculators computes specdec's EAGLE-3 draft logits (max abs diff {worst:.3e} <= {TOLERANCE:g}, "
          f"{expected.shape[1]} positions, draft vocabulary {expected.shape[2]})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("half", choices=("write", "compare"), help="write: specdec's python; compare: speculators'")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    if args.half == "write":
        args.directory.mkdir(parents=True, exist_ok=True)
        write(args.directory.resolve())
        return 0
    if not (args.directory / "case.safetensors").is_file():
        parser.error(f"{args.directory} holds no case.safetensors: run `write {args.directory}` first")
    return compare(args.directory.resolve())


if __name__ == "__main__":
    sys.exit(main())
