"""The training job survives a killed rank: SIGKILL during training or during a checkpoint save tears
the whole job down, `--resume` continues from the last complete checkpoint with the same batches,
and the finished run is bit-identical to one that was never interrupted."""
import json
import os
import subprocess

import pytest
import torch

from omoe_ds.checkpoint.layout import COMPLETE_MARKER, latest_complete_tag
from omoe_ds.checkpoint.state import FAULT_ENV
from test_checkpoint import differences, fingerprint
from test_train_job import job_args, run_train_job

pytestmark = pytest.mark.distributed
STEPS = ["--max-steps", "12", "--save-every", "4", "--eval-every", "6", "--keep-checkpoints", "0",
         "--optimizer", "omoe", "--skip-step", "5", "--lr", "1e-3"]


def launch(tmp_path, flags, fault=None):
    return run_train_job(tmp_path, *flags, extra_env={FAULT_ENV: fault} if fault else None)


def ranks_left(out) -> list:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(out) in line and "omoe_ds.train" in line]


def final_state(out, step=12):
    """Everything the last checkpoint (step 12) holds that must not depend on the interruption."""
    tag_dir = out / "checkpoints" / f"global_step{step}"
    state = {}
    for name in sorted(os.listdir(tag_dir)):
        if name.endswith(".pt"):
            record = torch.load(tag_dir / name, weights_only=False)
            if name == "mp_rank_00_model_states.pt":  # also holds the config and the wall-clock time
                record = {k: record[k] for k in ("module", "lr_scheduler", "global_steps", "global_samples")}
            if isinstance(record, dict):
                record.pop("ds_config", None)  # names the run's own output dir
                record.pop("train_seconds", None)  # wall clock (ZeRO-3 keeps the client state per rank file)
            state[name] = record
    return state


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    proc = launch(tmp, [*job_args(tiny_bert, tiny_data, tmp / "run"), *STEPS])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp / "run"


@pytest.mark.parametrize("fault,last_complete", [("kill_in_step:7:1", "global_step4"),
                                                 ("kill_in_save:8:1", "global_step4")])
def test_killed_rank_then_resume_equals_the_uninterrupted_run(uninterrupted, tiny_bert, tiny_data, tmp_path, fault,
                                                              last_complete):
    out = tmp_path / "run"
    flags = [*job_args(tiny_bert, tiny_data, out), *STEPS]
    proc = launch(tmp_path, flags, fault=fault)
    assert proc.returncode != 0
    assert not ranks_left(out), "ranks outlived the job"
    log = proc.stdout + proc.stderr
    assert "exits with return code = -9" in log  # the launcher names the killed rank and tears the job down
    checkpoints = out / "checkpoints"
    assert latest_complete_tag(str(checkpoints)) == last_complete
    if fault.startswith("kill_in_save"):
        assert (checkpoints / "latest").read_text() == "global_step8"  # DeepSpeed's own pointer is not trusted
        assert not (checkpoints / "global_step8" / COMPLETE_MARKER).exists()
    kept = fingerprint(checkpoints / last_complete)
    metrics_before = (out / "metrics.jsonl").read_text()

    proc = launch(tmp_path, [*flags, "--resume"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert fingerprint(checkpoints / last_complete) == kept  # what was written before the crash is intact
    assert (out / "metrics.jsonl").read_text().startswith(metrics_before)
    assert differences(final_state(out), final_state(uninterrupted)) == []
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, uninterrupted))
    assert got["dev"] == want["dev"] and got["test"] == want["test"] and got["o_steps"] == want["o_steps"] == 2
    by_step = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "event" not in r}  # the last record per step
    want_lines = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [by_step[r["step"]]["dev"] for r in want_lines] == [r["dev"] for r in want_lines]


def test_resume_refusals(tiny_bert, tiny_data, tmp_path):
    from omoe_ds import OMoEConfigError
    from omoe_ds.finetune.train import main
    with pytest.raises(OMoEConfigError, match=r"no complete checkpoint in .*checkpoints"):
        main([*job_args(tiny_bert, tiny_data, tmp_path / "none"), "--resume"])
    with pytest.raises(OMoEConfigError, match=r"--resume .* --overwrite"):
        main([*job_args(tiny_bert, tiny_data, tmp_path / "none"), "--resume", "--overwrite"])


def test_resume_with_another_skip_step_is_refused_before_the_engine(uninterrupted, tiny_bert, tiny_data, tmp_path,
                                                                     single_process_group):
    """The job compares the "omoe" section with the checkpoint's before initialize writes anything (monitor files)."""
    import shutil
    from omoe_ds.checkpoint.layout import CheckpointError
    from omoe_ds.finetune.train import main
    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    before = fingerprint(out)
    with pytest.raises(CheckpointError, match=r"skip_step 5 saved, 3 now.*--skip-step 5"):
        main([*job_args(tiny_bert, tiny_data, out), *STEPS[:-4], "--skip-step", "3", "--lr", "1e-3", "--resume"])
    assert not (out / "monitor").exists()
    assert fingerprint(out) == before


def test_an_exported_run_trains_further(uninterrupted, tiny_data, tmp_path):
    """The finished run, exported to one directory, is a --model for the job again (at another EP size)."""
    from omoe_ds.checkpoint.export import export_checkpoint
    exported = tmp_path / "exported"
    export_checkpoint(str(uninterrupted / "checkpoints"), str(exported))
    out = tmp_path / "again"
    flags = job_args(str(exported), tiny_data, out)
    flags[flags.index("--ep-size") + 1] = "1"
    proc = launch(tmp_path, [*flags, "--max-steps", "3", "--optimizer", "omoe", "--skip-step", "2"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3 and results["o_steps"] == 1 and 0 <= results["dev"]["accuracy"] <= 1
