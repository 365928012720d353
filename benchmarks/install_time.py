"""The README's install with and without pip's byte-compilation, side by side.

pip compiles every ``.py`` file it installs to bytecode: ~18,000 files for capfilt's dependencies
(torch, ray, transformers, scipy, sympy, ...), most of which the main job never imports. With
``--no-compile`` pip skips that, and Python compiles a module the first time a process imports it
(writing the same ``__pycache__`` file pip would have). This script takes the ``pip install`` of
the README's install command (the ``<!-- ci:install -->`` block that ``.ci/run`` runs) and times,
in fresh virtual environments under a temporary directory, alternating ``--repeats`` times:

  (a) that command with pip's byte-compilation (``--no-compile`` removed, pip's default);
  (b) that command with ``--no-compile``;

and in each environment the first and the second import of the modules the main job's processes
import (the first pays for compiling them under (b)). Prints seconds per variant and the difference.

    python benchmarks/install_time.py [--repeats 1]

Downloads come from pip's cache after the first install, in both variants alike.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

JOB_IMPORTS = (
    "capfilt.cli",
    "capfilt.bootstrap.planner",
    "capfilt.bootstrap.backend",
    "capfilt.pipeline",
    "capfilt.train",
    "capfilt.eval",
    "capfilt.report",
    "model.hf",
    "ray.data",
    "transformers.models.blip",
)
"""What the main job's processes import (the bootstrap, its training children, Ray's workers)."""


def readme_pip_install(readme: str) -> list[str]:
    """The ``pip install ...`` part of the README's install command, as arguments."""
    block = re.search(r"<!-- ci:install -->\s*```bash\n(.*?)\n```", readme, re.S)
    if block is None:
        raise SystemExit("README.md: no ```bash block after <!-- ci:install -->")
    for part in block.group(1).split("&&"):
        words = shlex.split(part.strip())
        if words[:2] == ["pip", "install"]:
            return words
    raise SystemExit("README.md: the install command has no `pip install`")


def variants(pip: list[str]) -> dict[str, list[str]]:
    """(a) with pip's byte-compilation and (b) without, from the README's ``pip install``."""
    plain = [word for word in pip if word != "--no-compile"]
    return {"pip compiles (default)": plain, "--no-compile": [*plain[:2], "--no-compile", *plain[2:]]}


def timed(command: list[str], *, cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="installs per variant, alternating")
    args = parser.parse_args(argv)
    commands = variants(readme_pip_install((REPO / "README.md").read_text(encoding="utf-8")))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    results: dict[str, dict[str, list[float]]] = {
        name: {"install": [], "first import": [], "second import": []} for name in commands
    }
    importer = ["-c", "import " + ", ".join(JOB_IMPORTS)]
    with tempfile.TemporaryDirectory(prefix="capfilt-install-") as tmp:
        for repeat in range(args.repeats):
            for name, pip in commands.items():
                venv = Path(tmp) / f"venv-{'b' if '--no-compile' in pip else 'a'}-{repeat}"
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
                python = str(venv / "bin" / "python")
                seconds = timed([python, "-m", *pip], cwd=REPO, env=env)
                results[name]["install"].append(seconds)
                for label in ("first import", "second import"):
                    results[name][label].append(timed([python, *importer], cwd=Path(tmp), env=env))
                print(
                    f"{name}: install {seconds:.0f} s, first import {results[name]['first import'][-1]:.1f} s, "
                    f"second import {results[name]['second import'][-1]:.1f} s",
                    flush=True,
                )
    print(f"\n{args.repeats} install(s) per variant, alternating; `{shlex.join(commands['--no-compile'])}`")
    means = {}
    for name, figures in results.items():
        means[name] = {label: statistics.fmean(values) for label, values in figures.items()}
        print(
            f"  {name:<24} install {means[name]['install']:6.1f} s   first import "
            f"{means[name]['first import']:5.1f} s   second import {means[name]['second import']:5.1f} s"
        )
    (a, b) = means.values()
    saved = (a["install"] + a["first import"]) - (b["install"] + b["first import"])
    print(f"install + first import: {saved:+.1f} s with --no-compile")
    return results


if __name__ == "__main__":
    main()
