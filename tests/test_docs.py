"""The manual is true to the code: every relative link in README.md and docs/ leads somewhere, and
every `--flag` the pages name is a setting of one of our scripts (or of the program it is given to)."""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import pytest
from accelerate.commands.launch import launch_command_parser

from ldm.app import ServerConfig
from ldm.data.config import CacheConfig, DataConfig
from ldm.evaluation.config import EvaluateConfig
from ldm.generation.config import GenerateConfig
from ldm.training.config import HeldOutConfig, TrainConfig
from ldm.training.distill_config import DistillConfig
from ldm.training.unet_config import UNetConfig
from ldm.training.vae_config import VAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SETTINGS = (DataConfig, CacheConfig, TrainConfig, HeldOutConfig, VAEConfig, UNetConfig, DistillConfig, GenerateConfig,
            ServerConfig, EvaluateConfig)
# Flags the pages give to other programs, by the program that takes them.
OTHER_PROGRAMS = {
    "no-deps": "pip install",
    "signal": "SLURM's sbatch",
    "type": "hf repos create", "sdk": "hf repos create", "repo-type": "hf upload",
    "flag": "the placeholder of `[--flag value ...]`",
}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*)")


def page_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def anchors(path: str) -> set[str]:
    """GitHub's ids for the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+)$", page_text(path), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def our_command_line_flags() -> set[str]:
    """The flags of every argparse command here (ldm's `python -m` commands and bench/'s scripts)."""
    flags = set()
    for path in glob.glob(os.path.join(ROOT, "ldm", "**", "*.py"), recursive=True) + glob.glob(
            os.path.join(ROOT, "bench", "*.py")):
        flags |= set(re.findall(r"add_argument\(\s*\"--([\w-]+)\"", page_text(path)))
    return flags


def known_flags() -> set[str]:
    settings = {field.name for config in SETTINGS for field in dataclasses.fields(config)}
    accelerate = {option.lstrip("-") for action in launch_command_parser()._actions
                  for option in action.option_strings}
    return settings | {"config"} | our_command_line_flags() | accelerate | set(OTHER_PROGRAMS)


def test_the_manual_has_its_pages():
    names = {os.path.basename(path) for path in PAGES}
    assert {"README.md", "architecture.md", "data.md", "train-vae.md", "train-unet.md", "distillation.md", "lora.md",
            "generation.md", "evaluation.md", "deployment.md", "web-ui.md", "gpus.md", "reliability.md"} <= names
    assert len(page_text(PAGES[0]).splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda path: os.path.relpath(path, ROOT))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page_text(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved):
            broken.append(f"{target} (no {os.path.relpath(resolved, ROOT)})")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{os.path.relpath(page, ROOT)} links to what is not there: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: os.path.relpath(path, ROOT))
def test_every_flag_named_exists(page):
    unknown = sorted(set(FLAG.findall(page_text(page))) - known_flags())
    assert not unknown, f"{os.path.relpath(page, ROOT)} names flags that no script takes: {unknown}"
