"""The docs stay runnable: every ``specdec ...`` command in the code blocks of BENCHMARKS.md and
README.md parses with today's CLI (bench's method names included), and README's Layout names every
module of ``specdec/``.

Nothing runs and no model loads: `specdec.cli.build_parser()` parses a line, bench's
`check_methods` checks its methods, `specdec.training.cli.parse` parses ``specdec train ...``.
"""

import re
import shlex
from collections import defaultdict
from pathlib import Path

import pytest

from specdec import cli
from specdec.bench import BenchConfig, check_methods, parse_packed_from
from specdec.devices import parse_device, parse_dtype
from specdec.training import cli as train_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("BENCHMARKS.md", "README.md")
SHELL = ("", "bash", "sh", "shell")  # code-block languages whose lines are commands


def specdec_argv(line: str) -> list[str] | None:
    """The arguments after ``specdec`` (``python -m specdec.training X`` is ``train X``), or None
    for a line that is not a specdec command."""
    words = line.split()
    if not words or words[0] not in ("specdec", "python", "python3"):
        return None
    if words[0] != "specdec" and words[1:3] not in (["-m", "specdec"], ["-m", "specdec.training"]):
        return None
    words = shlex.split(line, comments=True)
    if words[0] == "specdec":
        return words[1:]
    return (["train"] if words[2] == "specdec.training" else []) + words[3:]


def doc_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``(file:line, argv)`` for each specdec command in the shell code blocks of `path`,
    backslash-continued lines joined."""
    found, lang, pending, start = [], None, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.fullmatch(r"```(\w*)\s*", line)
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        if lang not in SHELL:
            continue
        start = start if pending else n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        argv, pending = specdec_argv(pending + line), ""
        if argv is not None:
            found.append((f"{path.name}:{start}", argv))
    return found


COMMANDS = [c for name in DOCS for c in doc_commands(ROOT / name)]


def check(argv: list[str]) -> None:
    """Parse `argv` as the CLI would, up to the first model load; raise on anything it refuses."""
    if argv[:1] == ["train"]:
        train_cli.parse(argv[1:])  # UsageError on a line that does not parse
        return
    try:
        args = vars(cli.build_parser().parse_args(argv))
    except SystemExit:  # argparse said why on stderr
        raise ValueError(f"does not parse: specdec {shlex.join(argv)}") from None
    command = args.pop("command")
    cfg = cli.COMMANDS[command][0](**args)
    if hasattr(cfg, "device"):
        parse_device(cfg.device)
        parse_dtype(cfg.dtype)
    if command == "bench":
        check_methods(cfg)
        parse_packed_from(cfg.packed_from)
    if command == "generate" and cfg.drafter != "none":
        assert ":" not in cfg.drafter, f"--drafter {cfg.drafter}: the :variant suffixes are bench's"
        check_methods(BenchConfig(methods=f"baseline,{cfg.drafter}", draft_model=cfg.draft_model))


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, argv):
    check(argv)


def test_the_docs_commands_are_found():
    """The extraction sees what the docs hold: every subcommand that BENCHMARKS.md uses, and the
    README's CLI block."""
    bench_doc = {argv[0] for where, argv in COMMANDS if where.startswith("BENCHMARKS.md")}
    assert {"bench", "profile", "datastore", "train"} <= bench_doc
    readme = {argv[0] for where, argv in COMMANDS if where.startswith("README.md")}
    assert {"generate", "bench", "profile", "demo"} <= readme
    assert sum(where.startswith("BENCHMARKS.md") and argv[0] == "bench" for where, argv in COMMANDS) >= 10


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--methods", "baseline,prompt-lookup:guard"],  # the suffix that became :noguard
        ["bench", "--methods", "baseline,no-such-drafter"],
        ["bench", "--methods", "prompt-lookup"],  # no baseline to check against
        ["bench", "--no-such-option", "1"],
        ["generate", "--drafter", "prompt-lookup+no-such-drafter", "hi"],
        ["profile", "--threads", "two"],
        ["train", "eagle", "--model", "m", "--data", "d", "--output-dir", "o", "--no-such-option", "1"],
        ["train", "no-such-command"],
    ],
)
def test_check_refuses_what_the_cli_refuses(argv):
    with pytest.raises((ValueError, train_cli.UsageError)):
        check(argv)


def test_a_continued_command_is_one_command(tmp_path):
    doc = tmp_path / "DOC.md"
    doc.write_text("text\n```bash\nspecdec bench --model m \\\n  --methods baseline,plain   # a comment\nmake demo\n"
                   "python -m specdec.training eagle --model m\n```\n```python\nspecdec --not-shell\n```\n")
    assert doc_commands(doc) == [
        ("DOC.md:3", ["bench", "--model", "m", "--methods", "baseline,plain"]),
        ("DOC.md:6", ["train", "eagle", "--model", "m"]),
    ]


def test_readme_layout_names_every_module():
    """Each ``specdec/...`` folder of the Layout block lists every module in it (``__init__.py``
    may go unnamed) and nothing that is not there."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Layout\n+```\n(.*?)^```", text, re.DOTALL | re.MULTILINE).group(1)
    named, folder = defaultdict(set), None
    for line in block.splitlines():
        if line and not line[0].isspace():
            folder, _, line = line.partition(" ")
        named[folder] |= set(re.findall(r"\b[\w]+\.py\b", line))
    folders = sorted({p.parent for p in (ROOT / "specdec").rglob("*.py")})
    for path in folders:
        key = path.relative_to(ROOT).as_posix() + "/"
        present = {p.name for p in path.glob("*.py")}
        assert key in named, f"README Layout has no line for {key}"
        missing = present - named[key] - {"__init__.py"}
        assert not missing, f"README Layout, {key}: add {sorted(missing)}"
        assert named[key] <= present, f"README Layout, {key}: no such module {sorted(named[key] - present)}"
    stale = {k for k in named if k.startswith("specdec")} - {p.relative_to(ROOT).as_posix() + "/" for p in folders}
    assert not stale, f"README Layout names folders that are not there: {sorted(stale)}"
