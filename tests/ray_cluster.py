"""A real multi-node Ray cluster on this machine, owned by one test: started and stopped by PID.

Each node is one ``ray start ... --block`` process started in its own session (process group),
so the test can stop exactly its own nodes: never ``ray stop``, which stops every Ray on the
machine. Ray 2.60's ``ray start --head`` enables token authentication, so every node, and every
job driver they start, gets the same random token through ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``.

Isolation from other Ray sessions on the machine (the integration tests' own ``ray_session``,
other users' clusters): every port is a free one chosen here (GCS, dashboard, dashboard agent,
client server, node and object managers, metrics, runtime env agent, worker ports), and the
cluster has its own short ``--temp-dir``, which is also where ``ray start`` records the
"current cluster" address (``ray_current_cluster``): a plain ``ray.init()`` elsewhere on the
machine never finds this cluster.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PORT_OPTIONS = (
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)
WORKER_PORTS = 24
"""Ports each node's worker processes may use (a private range per node)."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_range(length: int) -> int:
    """First port of ``length`` consecutive ports that are free now (best effort)."""
    for _ in range(200):
        start = int.from_bytes(secrets.token_bytes(2), "big") % 20_000 + 30_000
        held = []
        try:
            for port in range(start, start + length):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free port range")


RAY_OWN_PROCESSES = frozenset(
    {"IDLE", "DashboardAgent", "RuntimeEnvAgent", "JobSupervisor", "_StatsActor", "AutoscalingRequester"}
)
"""Process titles (after ``ray::``) of Ray's own agents and actors, and of idle workers."""


@dataclass(frozen=True)
class Proc:
    """A process seen in /proc, identified by pid AND start time (a reused pid is not this one)."""

    pid: int
    start: int

    @staticmethod
    def stat(pid: int) -> tuple[int, int] | None:
        """(parent pid, start time in clock ticks) or None if gone."""
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        return int(fields[1]), int(fields[19])

    def running(self) -> bool:
        stat = Proc.stat(self.pid)
        if stat is None or stat[1] != self.start:
            return False
        try:  # a zombie has exited
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def title(self) -> str:
        try:
            return Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def descendants(pid: int) -> list[Proc]:
    """Every live descendant of ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[Proc]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = Proc.stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append(Proc(int(entry.name), stat[1]))
    found: list[Proc] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child.pid)
    return found


@dataclass
class Node:
    """One ``ray start --block`` process (the leader of its own process group) and its log."""

    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def descendants(self) -> list[Proc]:
        return descendants(self.proc.pid)

    def busy_workers(self) -> list[str]:
        """Names of this node's Ray worker processes running a task or actor of a job (not Ray's own)."""
        names = [p.title().split(" ", 1)[0] for p in self.descendants()]
        return [
            n for n in names if n.startswith("ray::") and n.removeprefix("ray::") not in RAY_OWN_PROCESSES
        ]

    def kill(self, sig: int = signal.SIGKILL, grace_s: float = 15.0) -> None:
        """Signal this node's process group and every descendant (snapshot taken first), then wait."""
        tree = self.descendants()
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.alive() or any(p.running() for p in tree)):
            time.sleep(0.1)
        for p in tree:  # processes that left the group (job drivers start their own session)
            p.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class LocalCluster:
    """A head node plus worker nodes on 127.0.0.1, each ``num_cpus`` CPUs, sharing one auth token."""

    root: Path
    token: str
    gcs_port: int
    dashboard_port: int
    python_bin: Path
    object_store_bytes: int = 150 * 1024 * 1024
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def create(cls, *, python: str = sys.executable) -> LocalCluster:
        # Short: Ray puts Unix sockets under the temp dir and a socket path is limited to 107 bytes.
        root = Path(tempfile.mkdtemp(prefix="cfray-", dir="/tmp"))
        gcs_port, dashboard_port = free_ports(2)
        return cls(
            root=root,
            token=secrets.token_hex(32),
            gcs_port=gcs_port,
            dashboard_port=dashboard_port,
            python_bin=Path(python).parent,
        )

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def head(self) -> Node:
        return self.nodes[0]

    def env(self) -> dict[str, str]:
        """Environment of every node (and so of every job driver the head starts)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            NO_ALBUMENTATIONS_UPDATE="1",
            no_proxy="127.0.0.1,localhost",
            PYTHONUNBUFFERED="1",
            # The job entrypoint `capfilt run` resolves to this interpreter's capfilt.
            PATH=f"{self.python_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        return env

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _ray(self) -> list[str]:
        return [str(self.python_bin / "python"), "-m", "ray.scripts.scripts"]

    def start_node(self, *, num_cpus: int = 1, timeout_s: float = 180.0, attempts: int = 4) -> Node:
        """Start the head (first call) or a worker node; returns once the cluster counts it.

        ``ray start`` gives its raylet a fixed 30 s to register; on a machine that busy it exits,
        and the start is tried again (its leftover processes killed first).
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._start_node(num_cpus=num_cpus, timeout_s=timeout_s)
            except RuntimeError:
                failed = self.nodes.pop()
                failed.kill()
                if attempt == attempts:
                    raise
                if not self.nodes:  # the head: a fresh GCS port, the old one may linger
                    self.gcs_port, self.dashboard_port = free_ports(2)
        raise AssertionError("unreachable")

    def _start_node(self, *, num_cpus: int, timeout_s: float) -> Node:
        index = len(self.nodes)
        name = "head" if index == 0 else f"worker{index}"
        ports = dict(zip(_PORT_OPTIONS, free_ports(len(_PORT_OPTIONS)), strict=True))
        low = free_port_range(WORKER_PORTS)
        args = [
            *self._ray(), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            "--num-gpus=0", f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={self.root / 'ray'}", "--disable-usage-stats",
            f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS - 1}",
            *(f"{k}={v}" for k, v in ports.items()),
        ]  # fmt: skip
        if index == 0:
            (client_port,) = free_ports(1)
            args += [
                "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client_port}",
            ]  # fmt: skip
        else:
            args += [f"--address={self.gcs_address}"]
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args,
                cwd=self.root,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        node = Node(name=name, proc=proc, log=log)
        self.nodes.append(node)
        self.wait_for_nodes(len(self.nodes), timeout_s=timeout_s)
        return node

    def alive_nodes(self) -> int:
        """Alive nodes as the head's GCS sees them (a subprocess: this process may have its own Ray)."""
        probe = (
            "import ray, sys\n"
            f"ray.init(address='{self.gcs_address}', log_to_driver=False, logging_level='ERROR')\n"
            "print(sum(1 for n in ray.nodes() if n['Alive']))\n"
        )
        try:
            out = subprocess.run(
                [str(self.python_bin / "python"), "-c", probe],
                env=self.env(),
                cwd=self.root,
                capture_output=True,
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return -1
        try:
            return int(out.stdout.decode().strip().splitlines()[-1])
        except (IndexError, ValueError):
            return -1

    def wait_for_nodes(self, count: int, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for node in self.nodes:
                if not node.alive():
                    raise RuntimeError(f"ray node {node.name} exited:\n{self.logs()}")
            if self.dashboard_ready() and self.alive_nodes() >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"cluster did not reach {count} nodes in {timeout_s:.0f} s:\n{self.logs()}"
                )
            time.sleep(1.0)

    def dashboard_ready(self) -> bool:
        import urllib.request

        request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=self.auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
                return response.status == 200
        except OSError:
            return False

    def job_client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.auth_headers())

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for node in self.nodes:
            try:
                text = node.log.read_text(errors="replace")
            except OSError:
                text = ""
            parts.append(f"--- {node.name} (pid {node.proc.pid}) ---\n{text[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop every node this object started (workers first), then remove the temp dir."""
        for node in reversed(self.nodes):
            node.kill(signal.SIGTERM)
        shutil.rmtree(self.root, ignore_errors=True)
