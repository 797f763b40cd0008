"""The OMoE small job (EP=2, 2 ranks) on two "hosts" (127.0.0.2, 127.0.0.3, 1 slot each) through every
launch path of launch/: it finishes, each rank saw its node rank and ran on its host, and its results
equal the single-node 2-rank run within 1e-6."""
from __future__ import annotations

import os

import pytest

import mn_harness as mh
from mn_harness import job_args, record

pytestmark = [pytest.mark.multinode, pytest.mark.distributed]
# The same 2 ranks, seeds and fp32 ops: every 2-rank all-reduce is one correctly rounded a + b whatever the
# launcher or transport, so the bits should match (measured: 0 difference on every path). TOL only admits a
# reduction in another order: ~2 ulps (2^-24 each, |loss|, |θ| ≲ 1) per step over 6 steps ≈ 7e-7; a wrong
# rank, host or data shard moves them by ≫ 1e-3.
TOL = 1e-6
LAUNCH = mh.REPO / "launch"
ROOT_OMPI = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
# MPICH's own traffic (mpi4py discovery) over libfabric's tcp provider on lo only.
MPICH_LO = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo"}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for name in a:
        assert len(a[name]) == len(b[name]), name
        worst = max([worst, *(abs(x - y) for x, y in zip(a[name], b[name]))])
    return worst


def check(run: mh.Run, reference: mh.Run, where: str = "ssh") -> list[dict]:
    """Finished, node ranks and hosts right, results equal to the single-node run."""
    assert run.returncode == 0 and not run.timed_out, run.describe()
    ranks, ref = run.ranks(), reference.ranks()
    assert [r["rank"] for r in ranks] == [0, 1], run.describe()
    for r in ranks:
        assert r["world_size"] == 2
        assert r["node_rank"] == r["rank"], (r["node_rank"], r["node_rank_source"], r["env"])
        assert r["master_addr"] == mh.HOSTS[0]
        if where == "ssh":  # started through the sshd of the host its node rank names
            assert r["launch_address"] == mh.HOSTS[r["node_rank"]], r["env"].get("SSH_CONNECTION")
        else:  # slurm: the slurmd of node n<k+1>
            assert r["env"]["SLURMD_NODENAME"] == mh.SlurmCluster.NODES[r["node_rank"]][0], r["env"]
    worst_loss = worst_param = 0.0
    assert len(ref) == len(ranks)
    for got, want in zip(ranks, ref):
        assert [x["optimizer"] for x in got["runs"]] == [x["optimizer"] for x in want["runs"]] == ["adamw", "omoe"]
        for run_got, run_want in zip(got["runs"], want["runs"]):
            # something to compare: a loss per micro-step, and parameters
            assert len(run_got["losses"]) == len(run_want["losses"]) >= mh.STEPS and run_want["params"]
            loss_diff = max(abs(x - y) for x, y in zip(run_got["losses"], run_want["losses"]))
            param_diff = max_abs_diff(run_got["params"], run_want["params"])
            worst_loss, worst_param = max(worst_loss, loss_diff), max(worst_param, param_diff)
            assert loss_diff < TOL, (got["rank"], run_got["optimizer"], loss_diff)
            assert param_diff < TOL, (got["rank"], run_got["optimizer"], param_diff)
    mh.DIFFS.append((mh.TIMINGS[-1][0] if mh.TIMINGS else str(run.cmd), worst_loss, worst_param))
    return ranks


def test_reference_is_one_node(reference):
    for r in reference.ranks():
        assert r["node_rank"] == 0 and r["env"]["CROSS_SIZE"] == "1" and r["launch_address"] is None


def test_pdsh_hostfile(cluster, reference, job_dir, tmp_path):
    """deepspeed --hostfile, default pdsh launcher over ssh (launch/multinode_pdsh.sh)."""
    env = cluster.env(extra={"HOSTFILE": str(cluster.hostfile), "MASTER_PORT": str(mh.free_port()),
                             "DS_ENV_FILE": str(cluster.deepspeed_env_file(tmp_path / "ds_env"))})
    run = mh.run_job(["bash", LAUNCH / "multinode_pdsh.sh", *job_args(job_dir)], env, job_dir, timeout=600)
    record("deepspeed --hostfile (pdsh/ssh)", run)
    ranks = check(run, reference)
    assert [r["node_rank_source"] for r in ranks] == ["CROSS_RANK"] * 2


def test_openmpi_launcher(cluster, reference, openmpi_venv, job_dir, tmp_path):
    """deepspeed --launcher openmpi: mpirun starts the ranks, mpi4py discovery inside init_distributed."""
    env = cluster.env(openmpi_venv, extra={
        **ROOT_OMPI, "HOSTFILE": str(cluster.hostfile), "MASTER_PORT": str(mh.free_port()), "MPI_IFACE": "lo",
        "DS_ENV_FILE": str(cluster.deepspeed_env_file(tmp_path / "ds_env", openmpi_venv))})
    run = mh.run_job(["bash", LAUNCH / "multinode_openmpi.sh", *job_args(job_dir)], env, job_dir, timeout=600)
    record("deepspeed --launcher openmpi (Debian Open MPI 4.1, mpi4py)", run)
    ranks = check(run, reference)
    assert all("OMPI_COMM_WORLD_RANK" in r["env"] for r in ranks)


def test_mpich_launcher(cluster, reference, mpich_venv, job_dir, tmp_path):
    """deepspeed --launcher mpich: Hydra starts a proxy per host over ssh, DeepSpeed's helper maps PMI_RANK."""
    env = cluster.env(mpich_venv, extra={
        "HOSTFILE": str(cluster.hostfile), "MASTER_PORT": str(mh.free_port()), "MPI_IFACE": "lo",
        "DS_ENV_FILE": str(cluster.deepspeed_env_file(tmp_path / "ds_env", mpich_venv, MPICH_LO))})
    run = mh.run_job(["bash", LAUNCH / "multinode_mpich.sh", *job_args(job_dir)], env, job_dir, timeout=600)
    record("deepspeed --launcher mpich (mpich wheel)", run)
    ranks = check(run, reference)
    assert all("PMI_RANK" in r["env"] for r in ranks)


@pytest.mark.parametrize("flavour", ["openmpi", "mpich"])
def test_plain_mpirun(flavour, cluster, reference, request, job_dir):
    """mpirun -np 2 without the DeepSpeed runner (launch/mpirun_plain.sh): mpi4py discovery."""
    venv = request.getfixturevalue(f"{flavour}_venv")
    extra = {**ROOT_OMPI} if flavour == "openmpi" else {**MPICH_LO}
    env = cluster.env(venv, extra={**extra, "HOSTFILE": str(cluster.hostfile), "MASTER_PORT": str(mh.free_port()),
                                   "MPI_IFACE": "lo"})
    run = mh.run_job(["bash", LAUNCH / "mpirun_plain.sh", *job_args(job_dir)], env, job_dir, timeout=600)
    record(f"plain mpirun -np 2 ({flavour}, mpi4py discovery)", run)
    ranks = check(run, reference)
    assert all("RANK" not in r["env"] or r["env"]["RANK"] == str(r["rank"]) for r in ranks)
    assert [r["node_rank_source"].split(":")[0] for r in ranks] == ["derived"] * 2


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_slurm_batch(launcher, slurm, cluster, reference, job_dir, tmp_path):
    """sbatch launch/slurm.sbatch on a local slurmctld + 2 slurmd (n1=127.0.0.2, n2=127.0.0.3)."""
    env = cluster.env(extra={**slurm.env(), "LAUNCHER": launcher, "MASTER_PORT": str(mh.free_port()),
                             "DS_ENV_FILE": str(cluster.deepspeed_env_file(tmp_path / "ds_env"))})
    log = tmp_path / "slurm-%j.out"
    # sbatch --wait polls with growing sleeps (a 10 s job returned after 42 s): poll the job state instead.
    submit_and_wait = ('jid=$(sbatch --parsable "$@") || exit 1; while sleep 0.5; do st=$(scontrol show job -o "$jid"); '
                       'case "$st" in *JobState=COMPLETED*) exit 0;; *JobState=PENDING*|*JobState=RUNNING*|'
                       '*JobState=CONFIGURING*|*JobState=COMPLETING*) ;; *) echo "$st"; exit 1;; esac; done')
    run = mh.run_job(["bash", "-c", submit_and_wait, "sbatch", "-o", str(log), LAUNCH / "slurm.sbatch",
                      *job_args(job_dir)], env, job_dir, timeout=600)
    logs = "\n".join(p.read_text()[-4000:] for p in tmp_path.glob("slurm-*.out"))
    record(f"sbatch launch/slurm.sbatch ({launcher})", run)
    assert run.returncode == 0, f"{run.describe()}\n{logs}\n{slurm.logs()}"
    ranks = check(run, reference, where="slurm")
    assert [r["node_rank_source"] for r in ranks] == ["SLURM_NODEID"] * 2
    assert os.path.exists(mh.REPO / "launch" / "slurm.sbatch")
