"""Training prompts that hand the model a text to work on: summarise it, answer a question from it,
list its points, rewrite it. Self-distillation from chat prompts alone teaches a drafter little
about answers that copy and compress their context (Spec-Bench's summarization, rag and
extraction), so these put such answers in its training data.

The texts are the target's own answers in a make-data output (never the benchmark file), and each
question of the "answer from the passage" kind is the prompt that produced its passage. Prompts
are written as {"source", "prompt"} lines, the format of ``train_prompts.jsonl``:

    python scripts/context_prompts.py --data runs/data-smollm2-magpie --output runs/prompts-context.jsonl --num 320
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from specdec.models import load_tokenizer
from specdec.training.data import load_examples, manifest_of, read_prompts, write_text_atomic

TEMPLATES = {
    "summarize": [
        "Summarize: {text}",
        "Summarize the following text in a few sentences.\n\n{text}",
        "Write a short summary of this passage:\n\n{text}",
    ],
    "passage-question": [
        "{text}\n\nBased on the passage above, answer the question: {question}",
        "Read the passage and answer the question.\n\nPassage: {text}\n\nQuestion: {question}",
    ],
    "points": [
        "List the main points of the following text as bullet points.\n\n{text}",
        "Extract the key facts from this text:\n\n{text}",
    ],
    "rewrite": [
        "Rewrite the following text in simpler words.\n\n{text}",
        "Make this text more formal:\n\n{text}",
    ],
}


def passages(data: str, min_chars: int) -> list[tuple[str, str]]:
    """(question, answer text) of every example in the make-data output `data` whose answer has at
    least `min_chars` characters; the question is the prompt that produced it (the manifest names
    the prompts file and the target, whose tokenizer decodes the answers)."""
    settings = manifest_of(data).get("settings")
    if "," in data or not settings:
        raise SystemExit(f"--data {data}: give one finished make-data output dir (with its manifest.json)")
    questions = read_prompts(settings["prompts"], settings.get("field", "prompt"), settings.get("limit"))
    tok = load_tokenizer(settings["model"])
    out = []
    for question, row in zip(questions, load_examples(data).select_columns(["input_ids", "prompt_length"]), strict=True):
        answer = tok.decode(row["input_ids"][int(row["prompt_length"]):], skip_special_tokens=True).strip()
        if len(answer) >= min_chars:
            out.append((question.strip(), answer))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a make-data output dir (its answers become the texts)")
    parser.add_argument("--output", required=True, help="jsonl to write")
    parser.add_argument("--num", type=int, default=320, help="prompts to write (at most one per text)")
    parser.add_argument("--min-chars", type=int, default=300, help="shorter answers are not used as texts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts = passages(args.data, args.min_chars)
    if args.num > len(texts):
        raise SystemExit(f"--num {args.num}: only {len(texts)} answers of {args.data} have >= {args.min_chars} "
                         "characters; lower --num or --min-chars")
    rng = random.Random(args.seed)
    kinds = list(TEMPLATES)
    lines = []
    for i, (question, text) in enumerate(rng.sample(texts, args.num)):
        kind = kinds[i % len(kinds)]
        prompt = rng.choice(TEMPLATES[kind]).format(text=text, question=question)
        lines.append(json.dumps({"source": f"context-{kind}", "prompt": prompt}))
    write_text_atomic(Path(args.output), "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} prompts to {args.output}")


if __name__ == "__main__":
    main()
