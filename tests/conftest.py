"""Shared fixtures: a loopback HTTP server the tests fill with files, and the run's Ray session.

``http_server`` is capfilt's own :class:`capfilt.serve.LoopbackServer` (the server behind
``capfilt serve`` and the bootstrap demo) over a temporary directory: ``http_server.add(path,
body)`` writes a file and returns its URL; misbehaviour (status codes, slow answers, cut or
chunked transfers, redirects, X-Robots-Tag headers) comes from its documented routes, e.g.
``f"{http_server.url}/slow/1.5/good.jpg"``. Nothing leaves 127.0.0.1, and the fixture stops the
server (joining every handler thread) when the module's tests are done.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from capfilt.serve import LoopbackServer

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# The downloader honours proxy variables like urllib does; the fixture server is local.
os.environ["no_proxy"] = "127.0.0.1,localhost"


class SiteServer(LoopbackServer):
    """A LoopbackServer over a directory that tests add files to as they go."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory=directory)
        self.directory = directory

    def add(self, path: str, body: bytes) -> str:
        """Serve ``body`` at ``path`` (a file under the root); returns its URL, quoted as needed."""
        target = self.directory / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        return self.url_for(path)


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteServer]:
    with SiteServer(tmp_path_factory.mktemp("site")) as server:
        yield server


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """The test run's Ray session; yields its GCS address for subprocesses to join."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
