"""Which int8 copy of a target drafts best for it: cost, agreement and value per scheme.

For each scheme: seconds to build the copy, milliseconds per one-token draft forward (with a KV
cache, next to the fp32 target's), agreement (teacher-forced top-1 agreement with the target
along the target's own greedy continuation of held-out training prompts: the chance a drafted
token is accepted) and the best chain's expected tokens per unit of target time,
max over L of (1 + a + ... + a^L) / (verify_cost(L) + L * draft_cost), with verify_cost the
model's stored `specdec profile` curve (packed as specdec would run it). Prompts come from
train_prompts.jsonl, never the benchmark file.

    python scripts/quant_schemes.py --model qwen2.5-coder-1.5b --prompts 8 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from specdec import kv, profile
from specdec.drafters.quantized import model_bytes, quantized_copy
from specdec.memory import size
from specdec.models import cache_dir, load_model

SCHEMES = {  # row name -> quantized_copy keywords (calibration filled in below)
    "int8 (per-channel weights, every linear)": dict(scheme="int8"),
    "int8-per-tensor": dict(scheme="int8-per-tensor"),
    "int8, fp32 lm_head": dict(scheme="int8", lm_head=False),
    "int8, first and last 2 layers fp32": dict(scheme="int8", keep="ends"),
    "int8-smooth, calibrated on 8 other prompts": dict(scheme="int8-smooth", calibration="prompts"),
    "int8-smooth, calibrated on one short prompt": dict(scheme="int8-smooth", calibration="short"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--data", default="../shared/data/train_prompts.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    rows = [json.loads(line)["prompt"] for line in open(args.data)]
    random.Random(0).shuffle(rows)
    prompts, calibration_prompts = rows[: args.prompts], rows[args.prompts : args.prompts + 8]

    def encode(text: str) -> torch.Tensor:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return torch.tensor([tok(chat, add_special_tokens=False).input_ids])

    with torch.no_grad():
        continuations = []
        for p in prompts:
            ids = encode(p)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False)
            continuations.append((ids.shape[1], out))

    def decode_ms(m, n: int = 16) -> float:
        cache = kv.new_cache(m)
        with torch.no_grad():
            m(input_ids=encode(prompts[0]), past_key_values=cache, use_cache=True)
            nxt = torch.tensor([[tok.eos_token_id or 0]])
            for _ in range(3):
                m(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            t0 = time.perf_counter()
            for _ in range(n):
                m(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return (time.perf_counter() - t0) / n * 1e3

    def agreement(m) -> float:
        hits = total = 0
        with torch.no_grad():
            for plen, out in continuations:
                predicted = m(input_ids=out).logits[0, plen - 1 : -1].argmax(-1)
                hits += int((predicted == out[0, plen:]).sum())
                total += out.shape[1] - plen
        return hits / total

    prof = profile.for_model(model, cache_dir())
    packing = profile.packing("auto", cache_dir())
    seconds = prof.forward_cost(packing.packed_from(model)) if prof else None
    verify_cost = (lambda n: seconds(n + 1) / seconds(1)) if seconds else (lambda n: 1 + 0.2 * n)
    target_ms = decode_ms(model)
    print(f"{args.model}: fp32 target {target_ms:.1f} ms per one-token forward; verify cost from "
          f"{'the stored profile' if seconds else 'the default curve (no profile stored)'}\n")
    print("| scheme | build | draft ms/token | draft cost (x target) | agreement | best chain | value | copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    layers = model.config.num_hidden_layers
    for name, options in SCHEMES.items():
        options = dict(options)
        if options.get("keep") == "ends":
            options["keep"] = tuple(f"model.layers.{i}." for i in (0, 1, layers - 2, layers - 1))
        if options.get("calibration") == "prompts":
            options["calibration"] = torch.cat([encode(p)[0] for p in calibration_prompts])
        elif options.get("calibration") == "short":
            options["calibration"] = encode("Say hello.")[0]  # what `specdec bench` warms up with
        t0 = time.perf_counter()
        copy = quantized_copy(model, **options)
        build = time.perf_counter() - t0
        ms, a = decode_ms(copy), agreement(copy)
        cost = ms / target_ms
        value, depth = max(
            (sum(a**k for k in range(n + 1)) / (verify_cost(n) + n * cost), n) for n in range(9)
        )
        print(f"| {name} | {build:.1f} s | {ms:.1f} | {cost:.2f} | {a:.3f} | {depth} | {value:.2f} | "
              f"{size(model_bytes(copy, shared_with=model))} |", flush=True)
        del copy


if __name__ == "__main__":
    main()
