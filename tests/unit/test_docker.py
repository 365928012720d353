"""docker/: the KubeRay RayJob's command is a valid `capfilt run`, and the image installs what the README does.

No image is built here (no Docker engine, no registry on the development machine): these tests
check the files' contents against the repository, which is what can drift.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from capfilt import config as cfgmod
from capfilt.cli import app

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
RAYJOB = REPO / "docker" / "rayjob.yaml"


def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text(encoding="utf-8"))


def entrypoint_args() -> list[str]:
    return shlex.split(rayjob()["spec"]["entrypoint"])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip()[:-1] + " " if raw.rstrip().endswith("\\") else raw.strip()
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def pip_installs(shell: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a shell command line (split at && and ;)."""
    found = []
    for part in re.split(r"&&|;", shell):
        words = shlex.split(part)
        if words[:2] == ["pip", "install"]:
            found.append(words[2:])
    return found


def readme_install() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- ci:install -->\s*```bash\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- ci:install --> block"
    return match.group(1)


# --------------------------------------------------------------------------- RayJob


def test_rayjob_is_a_kuberay_job_with_a_head_and_a_gpu_worker_group() -> None:
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = cluster["workerGroupSpecs"]
    assert len(workers) == 1
    worker = workers[0]["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert head["image"] == worker["image"], "head and workers must run the same image"
    assert entrypoint_args()[:3] == ["capfilt", "run", "pipelines/laion.yaml"]
    assert "output.dir=s3://" in job["spec"]["entrypoint"], "output on object storage"


def test_rayjob_entrypoint_is_accepted_by_capfilt_run_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entrypoint, unchanged, plus --dry-run, from the image's working directory (the repo layout).

    One override: ``output.dir`` is pointed at a local directory, because the RayJob's is an S3
    bucket, which needs network and credentials this test does not have; the override comes after
    the entrypoint's own ``--set output.dir=s3://...``, which is still parsed and validated. Nothing
    else needs the network in a dry run: the input URL is not fetched and hub models are not loaded.
    """
    args = entrypoint_args()
    assert args[:2] == ["capfilt", "run"]
    monkeypatch.chdir(REPO)  # the image's WORKDIR holds pipelines/ (checked below)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args[1:], "--dry-run", "--set", f"output.dir={out}"])
    assert result.exit_code == 0, result.output
    assert "ray:    auto" in result.output
    for stage in ("download", "caption", "filter", "select", "write"):
        assert stage in result.output
    assert "num_gpus=1" in result.output
    assert not out.exists(), "a dry run writes nothing"


def test_rayjob_actor_counts_fit_the_gpu_worker_group() -> None:
    args = entrypoint_args()
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = cfgmod.load(REPO / args[2], overrides)
    group = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    needed = sum(c.concurrency * c.num_gpus for c in (cfg.caption, cfg.filter) if c is not None)
    assert 0 < needed <= gpus * int(group["replicas"])
    assert cfg.ray.address == "auto"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_uses_a_cuda_runtime_base_and_capfilt_as_entrypoint() -> None:
    instructions = dockerfile_instructions()
    base = [args for name, args in instructions if name == "FROM"]
    assert len(base) == 1 and base[0].startswith("nvidia/cuda:") and "runtime" in base[0]
    entry = [args for name, args in instructions if name == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["capfilt"]


def test_dockerfile_installs_what_the_readme_installs() -> None:
    readme = pip_installs(readme_install())
    assert len(readme) == 1, "the README installs capfilt with one pip command"
    runs = [args for name, args in dockerfile_instructions() if name == "RUN"]
    docker = [install for run in runs for install in pip_installs(run)]
    assert readme[0] in docker, f"README: pip install {shlex.join(readme[0])}; Dockerfile: {docker}"


def test_dockerfile_copies_everything_the_install_needs() -> None:
    """The editable install needs pyproject.toml, its readme and packages; the RayJob needs pipelines/."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", pyproject["project"]["readme"], "pipelines"}
    needed |= {
        pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied: set[str] = set()
    for name, args in dockerfile_instructions():
        if name == "COPY":
            *sources, _ = shlex.split(args)
            copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
    assert all((REPO / c).exists() for c in copied)
    workdir = [args for name, args in dockerfile_instructions() if name == "WORKDIR"]
    assert workdir, "the RayJob's relative pipelines/laion.yaml needs the repo layout in WORKDIR"
