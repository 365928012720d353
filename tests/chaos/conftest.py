"""Fixtures of the chaos tests (helpers live in chaos/helpers.py).

Cases that must fail before any Ray work use ``no_ray``, so a regression that lets them
through fails at once instead of starting a cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos.helpers import can_mount


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the pipeline gets as far as starting Ray."""
    from capfilt import pipeline

    def refuse(address: str | None) -> bool:
        raise AssertionError("the error should have been raised before Ray starts")

    monkeypatch.setattr(pipeline, "_init_ray", refuse)


@pytest.fixture
def mount_namespace(tmp_path: Path) -> None:
    """Skip unless this process may make a private mount namespace (root with CAP_SYS_ADMIN).

    The real-disk cases run the CLI in ``unshare -m``, where a read-only bind mount or a
    tiny tmpfs gives the kernel's own EROFS / ENOSPC, and vanish with the namespace.
    """
    if not can_mount(tmp_path):
        pytest.skip("needs unshare -m and mount (root with CAP_SYS_ADMIN); the simulated cases still run")
