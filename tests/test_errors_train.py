"""`specdec train ...` mistakes: each is one ``specdec: error: ...`` line on stderr with exit status 2,
found before any long work, with nothing written to disk. The tiny target and prompts of
test_training are written to a temporary directory, so everything runs offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import MEDUSA_RECIPE, data_args, read_log, train_args, write_prompts, write_target
from specdec.training.cli import main
from specdec.training.data import make_data
from specdec.training.medusa import MedusaRecipe
from specdec.training.train import train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-errors")
    write_target(root / "tiny-target")
    write_prompts(root / "prompts.jsonl", 8, seed=0)
    make_data(data_args(root, "data", limit=8, save_hidden_states=False))
    (root / "a-file").write_text("not a directory\n")
    return root


def one_error(capsys, rc: int, *needles: str) -> str:
    """Asserts exit status 2 and a stderr of exactly one ``specdec: error:`` line holding every needle."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("specdec: error: "), err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def medusa(workdir: Path, *extra: str) -> list[str]:
    return ["medusa", "--model", str(workdir / "tiny-target"), "--data", str(workdir / "data"), "--max-steps", "2",
            "--batch-size", "2", "--num-heads", "2", *extra]


def test_train_mistakes_are_one_line(workdir, capsys):
    out = workdir / "never"
    cases = [
        (medusa(workdir, "--data", str(workdir / "no-data"), "--output-dir", str(out)), ["--data", "no-data"]),
        (medusa(workdir, "--output-dir", str(workdir / "a-file")), ["--output-dir", "a-file", "not a directory"]),
        (medusa(workdir, "--output-dir", str(workdir / "a-file" / "sub")), ["--output-dir", "a-file"]),
        (medusa(workdir, "--max-steps", "0", "--output-dir", str(out)), ["--max-steps", ">= 1"]),
        (medusa(workdir, "--threads", "0", "--output-dir", str(out)), ["--threads", ">= 1"]),
        (medusa(workdir, "--dtype", "float33", "--output-dir", str(out)), ["--dtype", "float33", "bfloat16"]),
        (medusa(workdir, "--lr-scheduler", "sideways", "--output-dir", str(out)), ["--lr-scheduler", "sideways"]),
        (medusa(workdir, "--model", str(workdir / "no-model"), "--output-dir", str(out)), ["no-model"]),
        (medusa(workdir, "--bogus", "1", "--output-dir", str(out)), ["--bogus", "specdec train medusa --help"]),
        (medusa(workdir, "--max-steps", "two", "--output-dir", str(out)), ["--max_steps", "two"]),
        (["draft-model", "--model", str(workdir / "tiny-target"), "--output-dir", str(out)], ["--draft"]),
        (["nope"], ["nope", "make-data", "medusa"]),
        (["make-data", "--model", str(workdir / "tiny-target"), "--prompts", str(workdir / "no-prompts.jsonl"),
          "--output-dir", str(out)], ["--prompts", "no-prompts.jsonl"]),
        (["make-data", "--prompts", str(workdir / "prompts.jsonl"), "--output-dir", str(workdir / "a-file")],
         ["--output-dir", "a-file"]),
        (["make-data", "--prompts", str(workdir / "prompts.jsonl"), "--limit", "0", "--output-dir", str(out)],
         ["--limit", ">= 1"]),
        (["make-data", "--prompts", str(workdir / "prompts.jsonl"), "--dtype", "int8", "--output-dir", str(out)],
         ["--dtype", "int8"]),
        (["make-prompts", "--output", str(workdir)], ["--output", "is a directory"]),
        (["make-prompts", "--output", str(workdir / "a-file" / "p.jsonl")], ["--output", "a-file"]),
        (["draft-vocab", "--model", str(workdir / "tiny-target"), "--drafter", str(workdir / "no-drafter"), "--data",
          str(workdir / "data")], ["no-drafter"]),
    ]
    for argv, needles in cases:
        one_error(capsys, main(argv), *needles)
    assert not out.exists()  # nothing half-written
    bad = workdir / "bad.jsonl"
    bad.write_text('{"prompt": "w1 w2"}\n{"prompt": \n')
    one_error(capsys, main(["make-data", "--prompts", str(bad), "--output-dir", str(out)]), f"{bad}:2")
    assert not out.exists()


class Killed(Exception):
    pass


def killed_run(workdir: Path, name: str, after: int, save_steps: int) -> Path:
    """A training run killed during step `after` + 1 (checkpoints every `save_steps`)."""
    recipe, steps = MedusaRecipe(MEDUSA_RECIPE), []
    real = recipe.loss

    def loss(*args):
        steps.append(1)
        if len(steps) > after:
            raise Killed
        return real(*args)

    recipe.loss = loss
    with pytest.raises(Killed):
        train(train_args(workdir, workdir / "data", name, max_steps=6, save_steps=save_steps), recipe)
    return workdir / name


def test_rerunning_a_killed_job_needs_resume(workdir, capsys):
    argv = lambda out, *extra: medusa(workdir, "--output-dir", str(out), "--max-steps", "6", "--log-steps", "1",  # noqa: E731
                                      "--num-heads", "3", *extra)
    # Killed after its first checkpoint ...
    out = killed_run(workdir, "killed", after=3, save_steps=2)
    capsys.readouterr()  # its progress bars
    one_error(capsys, main(argv(out)), "--resume", str(out))
    # ... and before it: the log would otherwise get a second step 1.
    early = killed_run(workdir, "killed-early", after=3, save_steps=5)
    assert [r["step"] for r in read_log(early)] == [1, 2, 3]
    capsys.readouterr()
    one_error(capsys, main(argv(early)), "--resume", "log.jsonl")
    assert main(argv(early, "--resume")) == 0
    assert [r["step"] for r in read_log(early) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((early / "drafter" / "drafter_config.json").read_text())["drafter"] == "medusa"


def test_resume_falls_back_from_a_truncated_checkpoint(workdir, capsys):
    from safetensors.torch import load_file

    straight = train(
        train_args(workdir, workdir / "data", "straight", max_steps=8, save_steps=3), MedusaRecipe(MEDUSA_RECIPE)
    )
    run = workdir / "truncated"
    train(train_args(workdir, workdir / "data", run.name, max_steps=8, save_steps=3), MedusaRecipe(MEDUSA_RECIPE))
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000006", "step-00000008"]
    weights = run / "checkpoints" / "step-00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    capsys.readouterr()
    resumed = train(train_args(workdir, workdir / "data", run.name, max_steps=8, save_steps=3, resume=True),
                    MedusaRecipe(MEDUSA_RECIPE))
    said = [line for line in capsys.readouterr().err.splitlines() if "step-00000008" in line]
    assert len(said) == 1 and "step-00000006" in said[0] and "model.safetensors" in said[0], said
    log = [r for r in read_log(run) if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in read_log(workdir / "straight") if "loss" in r],
                                                     rel=1e-5)
    a, b = load_file(str(straight / "drafter.safetensors")), load_file(str(resumed / "drafter.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # With no complete checkpoint left, --resume says so instead of starting over.
    for step in ("step-00000006", "step-00000008"):
        state = run / "checkpoints" / step / "model.safetensors"
        state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(train_args(workdir, workdir / "data", run.name, max_steps=8, save_steps=3, resume=True),
              MedusaRecipe(MEDUSA_RECIPE))
