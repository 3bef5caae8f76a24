"""The README's commands as a new user types them: every `neon` command in its bash blocks parses
(`--dry-run`), and the toy walk-through of "The `neon` command" runs as written, in order."""

import os
import shlex

import pytest

from neon import cli
from tests.conftest import REPO, save_base

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_text() -> str:
    return open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def readme_commands(text: str | None = None) -> list[list[str]]:
    """Every command of the ```bash blocks of `text` (default: the README): continuation lines
    joined, comments dropped."""
    commands, inside, pending = [], False, ""
    for line in (text or readme_text()).splitlines(keepends=True):
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if not inside:
            continue
        text = pending + line.split(" #")[0].strip() if not line.lstrip().startswith("#") else pending
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        if text.strip():
            commands.append(shlex.split(text))
    return commands


def neon_argv(command: list[str]) -> list[str] | None:
    """The argv of `neon` in a command (`neon …` or `torchrun … -m neon.cli …`), else None."""
    if command[0] == "neon":
        return command[1:]
    if command[0] == "torchrun" and "neon.cli" in command:
        return command[command.index("neon.cli") + 1 :]
    return None


def test_the_readme_has_commands():
    argvs = [neon_argv(c) for c in readme_commands()]
    assert sum(a is not None for a in argvs) >= 12


@pytest.mark.parametrize(
    "argv", [a for a in map(neon_argv, readme_commands()) if a is not None], ids=lambda a: " ".join(a)[:60]
)
def test_every_neon_command_of_the_readme_parses(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--config" in argv:  # a placeholder recipe name: parse it with a real one
        argv = [
            a if a != "RECIPE.yaml" else os.path.join(REPO, "configs/toy/diffusion_zeta1.1.yaml")
            for a in argv
        ]
    cli.main(argv + ["--dry-run"])
    assert capsys.readouterr().out.strip()


def test_the_toy_walk_through_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_base(tmp_path / "outputs" / "demo" / "diffusion-base.pt")  # what `make demo` writes first
    text = readme_text()
    steps = [
        neon_argv(c)
        for c in readme_commands(text[text.index("## The `neon` command") : text.index("More options:")])
    ]
    assert [s[0] for s in steps] == ["sample", "finetune", "sweep", "merge"]
    for argv in steps:
        cli.main(argv)
    assert os.path.exists("runs/neon.pt") and os.path.exists("runs/ft/sweep/results.jsonl")
