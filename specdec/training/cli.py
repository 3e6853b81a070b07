"""``specdec train <make-prompts|make-data|medusa|eagle|eagle3|draft-vocab|early-exit|draft-model>``: argument
parsing for the training commands.

Each command's arguments are dataclasses parsed by `transformers.HfArgumentParser`, so
``--help`` lists every field with its help text and default. The same entry point runs under
``accelerate launch -m specdec.training <command> ...`` for several processes or GPUs.

Every mistake (a bad or unknown argument, a missing file, an output directory that holds another
run) is one ``specdec: error: ...`` line on stderr and exit status 2, as in `specdec.cli`.

Boundary: the edge of the training layer; `specdec.cli` hands ``specdec train ...`` here.
"""

from __future__ import annotations

import shlex
import sys

from transformers import HfArgumentParser

from specdec.extras import require
from specdec.training.data import MakeDataArguments, make_data
from specdec.training.draft_model import DraftModelArguments, DraftModelRecipe
from specdec.training.draft_vocab import DraftVocabArguments, add_draft_vocab
from specdec.training.eagle import Eagle3Arguments, Eagle3Recipe, EagleArguments, EagleRecipe
from specdec.training.early_exit import EarlyExitArguments, EarlyExitRecipe
from specdec.training.medusa import MedusaArguments, MedusaRecipe
from specdec.training.prompts import MakePromptsArguments, make_prompts
from specdec.training.train import TrainArguments, train

COMMANDS = {
    "make-prompts": (
        "sample training prompts from the target itself (Magpie: its chat template up to a user message)",
        (MakePromptsArguments,),
    ),
    "make-data": ("self-distil training data: the target answers prompts (resumable)", (MakeDataArguments,)),
    "medusa": (
        "train Medusa heads on make-data output (frozen target; --joint: Medusa-2 with a LoRA-adapted target)",
        (TrainArguments, MedusaArguments),
    ),
    "eagle": (
        "train an EAGLE feature head (unrolled training-time test) on make-data output (frozen target)",
        (TrainArguments, EagleArguments),
    ),
    "eagle3": (
        "train an EAGLE-3 head (fused low/middle/high target layers, own lm_head over a draft vocabulary, "
        "training-time test) on make-data output; it exports to SGLang/vLLM layouts (specdec export)",
        (TrainArguments, Eagle3Arguments),
    ),
    "draft-vocab": (
        "give a trained Eagle or Medusa drafter a draft vocabulary: the most frequent answer tokens of "
        "make-data output",
        (DraftVocabArguments,),
    ),
    "early-exit": (
        "train an early-exit adapter on make-data output (frozen target)",
        (TrainArguments, EarlyExitArguments),
    ),
    "draft-model": (
        "distil a smaller LM (--draft) toward the target's distribution; saves an HF model dir",
        (TrainArguments, DraftModelArguments),
    ),
}
RECIPES = {MedusaArguments: MedusaRecipe, EagleArguments: EagleRecipe, Eagle3Arguments: Eagle3Recipe,
           EarlyExitArguments: EarlyExitRecipe,
           DraftModelArguments: DraftModelRecipe}


# What a bad input raises (CheckpointError is a ValueError); anything else is a bug and keeps its traceback.
ERRORS = (ValueError, RuntimeError, OSError, ImportError)


class UsageError(Exception):
    """A command line that does not parse."""


class _Parser(HfArgumentParser):
    def error(self, message: str):  # argparse's own: usage and a message over several lines, exit 2
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _usage() -> str:
    lines = ["usage: specdec train <command> [--help] [arguments]", "", "commands:"]
    lines += [f"  {name:<12} {help_text}" for name, (help_text, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        return _run(argv)
    except (UsageError, *ERRORS) as err:
        print("specdec: error: " + " ".join(str(err).split()), file=sys.stderr)  # one line
        return 2


def parse(argv: list[str]) -> tuple[str, list]:
    """``<command> [arguments]`` -> the command and its argument dataclasses, nothing run; a line
    that does not parse raises `UsageError`."""
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UsageError(f"specdec train: unknown command {command!r}; the commands are {', '.join(COMMANDS)} "
                         "(see `specdec train --help`)")
    help_text, classes = COMMANDS[command]
    parser = _Parser(classes, prog=f"specdec train {command}", description=help_text)
    *parsed, unknown = parser.parse_args_into_dataclasses(rest, return_remaining_strings=True,
                                                          look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return command, parsed


def _run(argv: list[str]) -> int:
    command, parsed = parse(argv)
    from transformers.utils import logging

    datasets = require("datasets", "train")  # before any work: the [train] extra installs both
    require("peft", "train")

    logging.set_verbosity_error()  # per-call generation-flag warnings would drown the progress bars
    datasets.disable_progress_bars()  # one bar per saved shard otherwise
    if command == "make-prompts":
        print(make_prompts(*parsed))
    elif command == "make-data":
        print(make_data(*parsed))
    elif command == "draft-vocab":
        print(add_draft_vocab(*parsed, command=shlex.join(["specdec", "train", *argv])))
    else:
        args, recipe_args = parsed
        print(train(args, RECIPES[type(recipe_args)](recipe_args), command=shlex.join(["specdec", "train", *argv])))
    return 0
