"""Varied chat prompts without a download, for self-distillation: templates over text installed on
this machine (the long descriptions of installed Python packages, stdlib docstrings) and hand-listed
topics, covering the kinds of request a chat model gets: summarize, extract, translate, code,
explain, compare, write, role-play, reason. Never reads the benchmark file. The paragraphs come
from whatever packages are installed, so another environment gives other prompts of the same kinds.

    python scripts/varied_prompts.py --output runs/q15/prompts-mix.jsonl

(the 870 prompts behind the shipped Qwen2.5-Coder-1.5B EAGLE-3 head; then `specdec train make-data`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import inspect
import json
import random
import re
from pathlib import Path

from specdec.training.data import write_text_atomic

MODULES = ["math", "statistics", "itertools", "functools", "string", "textwrap", "collections", "heapq", "bisect",
           "random", "os.path", "shutil", "json", "re", "datetime", "calendar", "fractions", "decimal", "difflib",
           "html", "urllib.parse", "base64", "hashlib", "zlib", "csv", "operator", "secrets", "uuid", "ipaddress"]
TOPICS = (
    "photosynthesis; black holes; the French Revolution; supply and demand; the immune system; plate tectonics; "
    "the Renaissance; quantum entanglement; inflation; the water cycle; the Roman Empire; machine learning; "
    "climate change; the printing press; DNA replication; the Cold War; game theory; vaccines; the stock market; "
    "the theory of evolution; the Industrial Revolution; electric cars; the Silk Road; general relativity; "
    "democracy in ancient Athens; antibiotics resistance; renewable energy; the human brain; cryptography; "
    "impressionist painting; the Great Depression; volcanoes; the scientific method; existentialism; "
    "the Moon landing; blockchain; the nitrogen cycle; Shakespeare's tragedies; the Ottoman Empire; "
    "entropy; microplastics; the Big Bang; Buddhism; the gig economy; coral reefs; the internet's history; "
    "nuclear fusion; utilitarianism; the Mongol Empire; sleep; compound interest; jazz; CRISPR; "
    "the Cold War arms race; the rule of law; urbanization; the Enlightenment; gravitational waves; "
    "bees and pollination; stoicism"
).split("; ")
FORMS = ["a short poem", "a short story", "a blog post", "a persuasive essay", "a product description",
         "a formal email", "a speech", "a haiku sequence", "a limerick", "a diary entry", "a news article",
         "a movie pitch", "a cover letter"]
SUBJECTS = ["a lighthouse keeper", "the first day of spring", "a robot learning to paint", "a lost umbrella",
            "remote work", "a small bakery", "a trip to Mars", "friendship", "a rainy city at night",
            "learning to code", "an old library", "a marathon runner", "a new smartphone", "recycling",
            "a dragon who is afraid of fire", "a chess tournament", "a time traveller", "the ocean",
            "a village festival", "a job interview"]
PERSONAS = ["a pirate captain", "Sherlock Holmes", "a medieval knight", "a customer support agent",
            "a travel guide in Rome", "a personal fitness coach", "a nutritionist", "a startup founder",
            "a stand-up comedian", "a wise old wizard", "a detective", "a high school chemistry teacher",
            "a sports commentator", "a museum curator", "a chef"]
ASKS = ["How should I start my day?", "What do you think about smartphones?", "Give me advice about saving money.",
        "Describe your typical day.", "What is the most important lesson you have learned?",
        "How do I make friends?", "Tell me about your biggest adventure.", "What should I eat before a long trip?",
        "How do I deal with stress?"]
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
LANGUAGES = ["French", "German", "Spanish", "Chinese", "Japanese", "Italian", "Portuguese", "Russian"]
SUMMARIZE = ["Summarize the following text in a few sentences:\n\n{}", "Give a one-paragraph summary of this:\n\n{}",
             "Summarize the key points of the text below as a bulleted list.\n\n{}"]
EXTRACT = ["Extract every software name, organisation and technical term from the text below and return them as a "
           'JSON object with keys "software", "organisations" and "terms".\n\n{}',
           "List the main facts stated in the following text, one per line.\n\n{}",
           "Read the text below and answer: what problem does it describe, and what solution does it offer?\n\n{}"]
CODE = ["Write a Python function `{f}` that does the following: {d} Include a docstring and an example.",
        "Implement `{f}` in Python without using the `{m}` module. Its job: {d}",
        "Explain what Python's `{m}.{f}` does ({d}) and show two examples of using it."]
EXPLAIN = ["Explain {} to a high school student.", "What are the main ideas behind {}?",
           "Write a short lecture on {} with three key points.", "What are common misconceptions about {}?"]
COMPARE = ["Compare {} and {}: what do they have in common?", "How did {} influence {}?"]


def local_text() -> tuple[list[str], list[str]]:
    """(prose paragraphs, sentences) from the installed packages' long descriptions."""
    paras, sentences = [], []
    for d in md.distributions():
        for p in re.split(r"\n\s*\n", d.metadata.get_payload() or ""):
            p = p.strip()
            prose = sum(c.isalpha() or c.isspace() for c in p) >= 0.9 * len(p)
            markup = p.startswith(("```", "    ", "|", ">>>", "..", "[!["))
            if 300 <= len(p) <= 1500 and not markup and p.count("http") < 2 and prose:
                paras.append(p)
            for s in re.split(r"(?<=[.!?])\s+", p):
                s = " ".join(s.split())
                if 50 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") and "http" not in s and "`" not in s:
                    sentences.append(s)
    return paras, sentences


def stdlib_functions() -> list[tuple[str, str, str]]:
    """(module, function, first docstring paragraph) of public stdlib callables."""
    funcs = []
    for name in MODULES:
        for fname, f in inspect.getmembers(importlib.import_module(name), callable):
            first = (inspect.getdoc(f) or "").split("\n\n")[0].replace("\n", " ").strip()
            if not fname.startswith("_") and 25 <= len(first) <= 200 and not first.startswith(fname):
                funcs.append((name, fname, first))
    return funcs


def reasoning(rng: random.Random) -> str:
    a, b, c = rng.sample(NAMES, 3)
    return rng.choice([
        f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest? Explain your reasoning step "
        f"by step.",
        f"{a}, {b} and {c} each own a different pet: a cat, a dog and a fish. {a} does not own the cat, {b} owns the "
        f"fish. Who owns the dog? Explain.",
        f"If {a} is twice as old as {b} was {rng.randint(2, 9)} years ago, and {b} is {rng.randint(20, 40)} now, "
        f"how old is {a}? Show your work.",
        f"{a} says {b} is lying. {b} says {c} is lying. {c} says both {a} and {b} are lying. Who is telling "
        f"the truth?"])


def prompts(seed: int = 0) -> list[str]:
    """The prompts, drawn and shuffled by `seed`."""
    rng = random.Random(seed)
    paras, sentences = local_text()
    funcs = stdlib_functions()
    for items in (paras, sentences, funcs):
        rng.shuffle(items)
    out = [rng.choice(SUMMARIZE).format(p) for p in paras[:160]]
    out += [rng.choice(EXTRACT).format(p) for p in paras[160:280]]
    out += [f"Translate the following sentence into {rng.choice(LANGUAGES)}: {s}" for s in sentences[:120]]
    out += [rng.choice(CODE).format(f=f, d=first, m=mod) for mod, f, first in funcs[:140]]
    for t in TOPICS:
        out.append(rng.choice(EXPLAIN).format(t))
        out.append(rng.choice(COMPARE).format(t, rng.choice(TOPICS)))
    out += [f"Write {rng.choice(FORMS)} about {rng.choice(SUBJECTS)}." for _ in range(90)]
    out += [f"Pretend you are {rng.choice(PERSONAS)}. {rng.choice(ASKS)}" for _ in range(60)]
    out += [reasoning(rng) for _ in range(60)]
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help='jsonl file to write ({"prompt": ...} per line)')
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = prompts(args.seed)
    write_text_atomic(Path(args.output), "".join(json.dumps({"prompt": p}) + "\n" for p in out))
    print(f"{len(out)} prompts -> {args.output}")


if __name__ == "__main__":
    main()
