"""The local SLURM cluster (``slurm/local_cluster.sh``) as pytest fixtures; imported by tests/conftest.py.

``slurm_cluster`` (session) runs ``local_cluster.sh up`` once, yields a :class:`SlurmCluster` and runs ``down``
at the end when a test session started it. ``slurm_env`` (per test) also puts ``SLURM_CONF`` (and the repository
on ``PYTHONPATH``, so jobs can unpickle test functions) into ``os.environ``, which submitit needs: it calls
``sbatch``/``sacct`` with the process environment.

Where the cluster cannot be started (not root; packages missing and no apt-get) the tests skip with the reason,
unless ``VGG_REQUIRE_SLURM=1`` (CI) turns that skip into a failure.

Several test sessions may share the one cluster (SLURM's ports are fixed): each holds a shared ``flock`` on
``<state>/users.lock`` while it runs, and only the last one to leave stops the cluster.

``slurm_cluster2`` / ``slurm2_env`` are the same for a two-node cluster (``local_cluster.sh up --nodes 2``) in its
own state folder (``$SLURM_LOCAL_DIR2``, default ``/tmp/vgg-slurm2``): its daemons live in network namespaces of
their own, so it runs beside the one-node cluster without touching it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local_cluster.sh"
STATE_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/vgg-slurm"))
STATE_DIR2 = Path(os.environ.get("SLURM_LOCAL_DIR2", "/tmp/vgg-slurm2"))  # the two-node cluster
REQUIRE_VAR = "VGG_REQUIRE_SLURM"
CANNOT_HOST = 77  # local_cluster.sh's exit status for "this machine cannot host the cluster"
PORTS = (6817, 6818, 6819, int(os.environ.get("SLURM_LOCAL_DB_PORT", "6829")))
DAEMON_NAMES = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "slurmstepd")


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``, or fail it when ``VGG_REQUIRE_SLURM=1`` (CI must run SLURM tests)."""
    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"{reason} ({REQUIRE_VAR}=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class SlurmCluster:
    """A running local cluster: ``env`` is a full environment for SLURM clients and jobs."""

    state_dir: Path
    conf: Path
    env: dict[str, str] = field(repr=False)
    partition: str = "debug"
    nodes: int = 1
    _users: _Users | None = field(default=None, repr=False, compare=False)

    @contextlib.contextmanager
    def alone(self, timeout: float = 600) -> Iterator[None]:
        """Hold the cluster exclusively (other test sessions sharing it are done) for a ``down``/``up`` cycle."""
        assert self._users is not None
        got = self._users.alone(timeout)
        try:
            if not got:
                skip_or_fail(f"another test session kept using the shared cluster for {timeout:.0f} s")
            # While we waited, the last other session may have stopped the cluster: bring it back.
            up = self.script("up")
            assert up.returncode == 0, f"slurm/local_cluster.sh up failed:\n{up.stdout}{up.stderr}"
            yield
        finally:
            self._users.share()

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``sinfo``, ``sbatch``, ...) against this cluster, capturing text."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def script(self, verb: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``local_cluster.sh VERB`` for this state folder (``up`` with this cluster's ``--nodes``)."""
        return _script(verb, timeout, self.state_dir, self.nodes)

    def sacct_states(self, job_id: str, duplicates: bool = False) -> list[str]:
        """States of the job's allocation as accounting (slurmdbd) has them; with ``duplicates`` also the
        records of earlier runs of a requeued job, oldest first."""
        cmd = ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"] + (["-D"] if duplicates else [])
        return [line.split()[0] for line in self.run(*cmd).stdout.splitlines() if line.strip()]

    def squeue_state(self, job_id: str) -> str:
        """The job's state in slurmctld (``PENDING``, ``RUNNING``, ...), or ``""`` once it left the queue."""
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()

    def start_requeued_now(self, job_id: str, timeout: float = 60) -> None:
        """Start a requeued job now instead of after SLURM's requeue delay (BeginTime ≈ now + 120 s).

        Waits until the old run has fully ended (squeue shows PENDING, no longer COMPLETING), then for the next
        full second: slurmd revokes the killed run's credential with 1-second resolution and refuses a relaunch
        in that same second ("Job N already killed, do not launch batch job"), which fails the job.
        """
        self.wait_for(
            f"requeued job {job_id} PENDING", lambda: self.squeue_state(job_id) == "PENDING", timeout
        )
        time.sleep(1.1 - time.time() % 1.0)
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def wait_for(self, what: str, predicate, timeout: float = 60, interval: float = 0.2):
        """Poll ``predicate()`` until it returns something truthy (returned) or fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                queue = self.run("squeue", check=False).stdout
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; squeue:\n{queue}")
            time.sleep(interval)


def _script(
    verb: str, timeout: float = 300, state_dir: Path = STATE_DIR, nodes: int = 1
) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state_dir), "SLURM_LOCAL_OWNER": "pytest"}
    extra = ["--nodes", str(nodes)] if verb == "up" and nodes > 1 else []
    return subprocess.run(
        ["bash", str(SCRIPT), verb, *extra], env=env, capture_output=True, text=True, timeout=timeout
    )


class _Users:
    """Shared flock held by each test session using the cluster; whoever can take it exclusively is alone."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # close-on-exec: daemons don't inherit it

    def _take(self, mode: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)

    def share(self, timeout: float = 300) -> bool:
        """Join the users (waits while another session is stopping the cluster)."""
        return self._take(fcntl.LOCK_SH, timeout)

    def alone(self, timeout: float = 0) -> bool:
        """Leave the users and take the lock exclusively: True when no other session uses the cluster."""
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return self._take(fcntl.LOCK_EX, timeout)

    def close(self) -> None:
        os.close(self.fd)


def net_tag(state_dir: Path) -> str:
    """The tag local_cluster.sh names a state folder's namespaces and interfaces with (``vgg-TAG-node1``)."""
    crc = subprocess.run(["cksum"], input=str(state_dir).encode(), capture_output=True, check=True).stdout
    return f"{int(crc.split()[0]) % 65536:04x}"


def leftovers(state_dir: Path = STATE_DIR, nodes: int = 1) -> list[str]:
    """Processes of our cluster still alive (daemons or step daemons whose command line or environment points
    into the state folder) and TCP ports of ours that accept connections; with several nodes, the network
    namespaces, veths and bridge of ours instead of ports (the daemons listen inside the namespaces). Empty after a
    clean ``down``."""
    import socket

    found = []
    conf_entry = f"SLURM_CONF={state_dir}/etc/slurm.conf".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            if not comm.startswith(DAEMON_NAMES):
                continue
            stat = (proc / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in "ZX":  # exited, waiting to be reaped
                continue
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        # a path in the state folder: "/tmp/vgg-slurm/" (with the slash), not a prefix of "/tmp/vgg-slurm2/..."
        folder = str(state_dir).encode()
        in_folder = any(a == folder or folder + b"/" in a for a in cmdline.split(b"\0"))
        if in_folder or conf_entry in environ.split(b"\0"):
            found.append(f"{comm} (pid {proc.name})")
    if nodes > 1:
        tag = net_tag(state_dir)
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        found += [f"network namespace {n}" for n in netns if n.startswith(f"vgg-{tag}-")]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        found += [f"interface {m}" for m in re.findall(rf"^\d+: (vgg{tag}\w*)", links, re.M)]
        found += [f"/etc/netns/{p.name}" for p in Path("/etc/netns").glob(f"vgg-{tag}-*")]
        return found
    for port in PORTS:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                found.append(f"listener on 127.0.0.1:{port}")
    return found


def _cluster_env(state_dir: Path = STATE_DIR) -> dict[str, str]:
    env = dict(os.environ)
    env["SLURM_CONF"] = str(state_dir / "etc" / "slurm.conf")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _session_cluster(state_dir: Path, nodes: int) -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        skip_or_fail("the local SLURM cluster needs root (slurm/local_cluster.sh starts daemons as root)")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    users = _Users(state_dir / "users.lock")
    if not users.share():
        users.close()
        pytest.fail(f"another test session kept {state_dir}/users.lock exclusively for 300 s", pytrace=False)
    up = _script("up", state_dir=state_dir, nodes=nodes)
    if up.returncode == CANNOT_HOST:
        users.close()
        skip_or_fail(up.stderr.strip().removeprefix("error: "))
    if up.returncode != 0:
        users.close()
        pytest.fail(f"slurm/local_cluster.sh up failed:\n{up.stdout}{up.stderr}", pytrace=False)
    cluster = SlurmCluster(
        state_dir=state_dir,
        conf=state_dir / "etc" / "slurm.conf",
        env=_cluster_env(state_dir),
        nodes=nodes,
        _users=users,
    )
    try:
        yield cluster
    finally:
        # Stop it only if a test session started it and no other session still uses it.
        owner = state_dir / "run" / "owner"
        if users.alone() and owner.exists() and owner.read_text().strip() == "pytest":
            down = _script("down", state_dir=state_dir)
            left = leftovers(state_dir, nodes)
            users.close()
            assert down.returncode == 0, f"slurm/local_cluster.sh down failed:\n{down.stdout}{down.stderr}"
            assert not left, f"slurm/local_cluster.sh down left behind: {', '.join(left)}"
        else:
            users.close()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Bring the local cluster up (installing packages on first use), yield it, stop it at session end."""
    yield from _session_cluster(STATE_DIR, 1)


@pytest.fixture(scope="session")
def slurm_cluster2() -> Iterator[SlurmCluster]:
    """The two-node cluster (node1, node2 in network namespaces of their own), like ``slurm_cluster``."""
    yield from _session_cluster(STATE_DIR2, 2)


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """``slurm_cluster`` with ``SLURM_CONF`` and ``PYTHONPATH`` set in ``os.environ`` for this test (submitit
    runs ``sbatch``/``sacct`` with the process environment, and jobs inherit it)."""
    for key in ("SLURM_CONF", "PYTHONPATH"):
        monkeypatch.setenv(key, slurm_cluster.env[key])
    monkeypatch.setenv(
        "VGG_ONE_MACHINE_CLUSTER", "1"
    )  # its node is this machine: /tmp run folders are shared
    return slurm_cluster


@pytest.fixture
def slurm2_env(slurm_cluster2: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """``slurm_env`` for the two-node cluster."""
    for key in ("SLURM_CONF", "PYTHONPATH"):
        monkeypatch.setenv(key, slurm_cluster2.env[key])
    monkeypatch.setenv(
        "VGG_ONE_MACHINE_CLUSTER", "1"
    )  # both nodes are this machine (namespaces): /tmp is shared
    return slurm_cluster2
