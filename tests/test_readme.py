"""The README's set-up: two commands, the test one being exactly what CI runs, on files the clone has."""

from __future__ import annotations

import re
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    """The command lines of the README's first code block under "Set up" (comments dropped)."""
    section = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Set up", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_setup_is_two_commands_and_ci_runs_the_test_one_verbatim():
    main_job, tests = setup_commands()
    assert main_job.startswith("python3 -m venv .venv && ") and "/ast tag " in main_job
    assert tests.startswith("python3 -m venv .venv && ") and tests.endswith("python -m pytest tests")
    ci = [line for line in ROOT.joinpath(".ci/run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [tests]
    assert tests in ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Test", 1)[1]


def test_the_main_job_tags_a_file_the_clone_has():
    main_job, _ = setup_commands()
    clip = ROOT / main_job.split("/ast tag ", 1)[1].split()[0]
    info = sf.info(clip)
    assert info.samplerate == 16000 and info.channels == 1 and 2 < info.duration < 10
