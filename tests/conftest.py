"""Shared fixtures: a loopback HTTP server the tests fill with files, the run's Ray session, and
the rule that only ``integration`` tests start Ray.

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


RAY_FIXTURES = ("ray_session", "cluster")
"""Fixtures that start Ray (this run's session, tests/integration/test_cluster.py's two nodes)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses a Ray fixture must carry the ``integration`` marker (``-m "not integration"``
    then runs without Ray)."""
    unmarked = [
        item.nodeid
        for item in items
        if set(RAY_FIXTURES) & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"these tests start Ray but lack the integration marker: {unmarked}")


@pytest.fixture(autouse=True)
def _ray_only_in_integration_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside ``integration`` tests, the pipeline starting Ray fails the test (it needs the marker)."""
    if request.node.get_closest_marker("integration") is not None:
        return
    from capfilt import pipeline

    def refuse(address: str | None) -> bool:
        raise AssertionError("this test starts Ray: mark it pytest.mark.integration")

    monkeypatch.setattr(pipeline, "_init_ray", refuse)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """The test run's Ray session; yields its GCS address for subprocesses to join."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
