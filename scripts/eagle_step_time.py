"""Time one Eagle training step (loss + backward, bf16 autocast as `--mixed-precision bf16`) over
the full lm_head and over a draft vocabulary, on the same batch of make-data output.

    python scripts/eagle_step_time.py runs/data-smollm2-1200 --threads 2

Prints the median of --repeats steps for each (vocabulary size, unroll) pair; the first step of
each pair is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdec.models import load_model
from specdec.training.data import collate, load_examples
from specdec.training.eagle import EagleArguments, EagleRecipe
from specdec.training.train import TrainArguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="make-data output with stored hidden states")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", default="8,9,10,11", help="indices of the batch's examples")
    parser.add_argument("--max-length", type=int, default=640)
    parser.add_argument("--vocab-sizes", default="0,8192", help="0: the full lm_head")
    parser.add_argument("--unrolls", default="1,3")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_model(args.model)[0]
    rows = load_examples(args.data)
    batch = collate(rows[[int(i) for i in args.examples.split(",")]], args.max_length)
    print(f"batch {tuple(batch.input_ids.shape)}, {int(batch.answer_mask.sum())} answer tokens")
    for size in (int(v) for v in args.vocab_sizes.split(",")):
        for unroll in (int(u) for u in args.unrolls.split(",")):
            recipe = EagleRecipe(EagleArguments(unroll=unroll, draft_vocab_size=size))
            head = recipe.build(target, TrainArguments(model=args.model, data=args.data))
            seconds = []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = recipe.loss(head, target, batch)
                loss.backward()
                seconds.append(time.perf_counter() - start)
            print(f"vocabulary {size or 'full'}, unroll {unroll}: {statistics.median(seconds[1:]):.3f} s per step")


if __name__ == "__main__":
    main()
