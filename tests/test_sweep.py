"""python -m omoe_ds.sweep and python -m omoe_ds.report: bad grids are refused before any launch; a tiny
2-cell sweep of real deepspeed launches finishes, a re-run launches nothing finished and redoes a
half-finished cell, a failed cell is recorded while the sweep goes on; the report writes its table and
valid PNGs, and skips the plots its results cannot fill."""
import json
import os
import re
import shutil

import pytest

from omoe_ds.studies import report, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_train_flags(model, data, ds_config, max_steps=4):
    return ["--model", model, "--task", "csv", "--data-dir", data, "--text-cols", "text", "--label-col", "label",
            "--max-length", "16", "--max-steps", str(max_steps), "--lr", "1e-3", "--deepspeed_config", ds_config]


@pytest.fixture(scope="module")
def tiny_ds_config(tmp_path_factory):
    """ZeRO-2 fine-tuning config with micro-batch 4 (as tests/test_train_job.py launches it)."""
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "finetune_zero2.json")))
    ds["train_micro_batch_size_per_gpu"] = 4
    path = tmp_path_factory.mktemp("ds") / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


def run_sweep(results_dir, axes, train_flags):
    return sweep.main(["--results-dir", str(results_dir), *axes, "--", *train_flags])


def events(results_dir):
    return [json.loads(line) for line in (results_dir / "sweep.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ no launches

@pytest.mark.parametrize("axes,match", [
    (["--experts", "2,3", "--ep-size", "2"], r"--ep-size=2 does not divide --experts value 3"),
    (["--experts", "4", "--ep-size", "4"], r"--ep-size=4 does not divide --world-size=2"),
    (["--optimizer", "omoe,lion"], r"unknown optimizer 'lion'.*omoe, plain, adamw"),
    (["--base-optimizer", "adam"], r"unknown optimizer 'adam'.*adamw, rmsprop, adagrad"),
    (["--skip-step", "5,1"], r"--skip-step: omoe.skip_step=1 is invalid.*>= 2"),
    (["--alpha0", "0"], r"--alpha0: omoe.alpha0=0.0 is invalid"),
    (["--lam", "1.5"], r"--lam: omoe.lam=1.5 is invalid"),
    (["--experts", "1,4"], r"--experts: 1 experts.*>= 2"),
    (["--seeds", "1,two"], r"--seeds: 'two' is not an integer"),
    (["--seeds", "-1"], r"--seeds: -1 is out of range"),
    (["--experts", "4,,8"], r"--experts='4,,8' has an empty entry"),
])
def test_bad_grid_values_are_refused_before_any_launch(tmp_path, capsys, axes, match):
    rc = sweep.main(["--results-dir", str(tmp_path / "res"), *axes, "--", "--task", "trec"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1
    assert re.search(match, err), err
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("train_flags,match", [
    (["--seed", "3"], r"\['--seed'\].*set by the sweep itself.*--seeds"),
    (["--alph", "0.5"], r"\['--alpha0'\].*set by the sweep itself"),  # an abbreviation argparse expands
    (["--exp", "8"], r"ambiguous option: --exp could match --experts, --expert-parallel"),
    (["--output-dir", "x"], r"--output-dir.*--results-dir"),
    (["--no-such-flag", "1"], r"not understood by omoe_ds.train.*--no-such-flag"),
    (["--deepspeed_config", "/nonexistent/ds.json"], r"/nonexistent/ds.json' does not exist"),
])
def test_bad_train_flags_are_refused_before_any_launch(tmp_path, capsys, train_flags, match):
    assert sweep.main(["--results-dir", str(tmp_path / "res"), "--", *train_flags]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not (tmp_path / "res").exists()


def test_grid_file_errors_are_refused(tmp_path, capsys):
    bad = tmp_path / "grid.json"
    bad.write_text(json.dumps({"skip_step": [2, 5], "expert": [4]}))
    assert sweep.main(["--results-dir", str(tmp_path / "res"), "--grid", str(bad)]) == 2
    assert "unknown key(s) ['expert']" in capsys.readouterr().err
    assert sweep.main(["--results-dir", str(tmp_path / "res"), "--grid", str(bad), "--seeds", "1"]) == 2
    assert "both given" in capsys.readouterr().err


def test_cells_are_deduplicated_and_ep_size_follows_experts():
    grid = sweep.grid_from_mapping({"skip_step": "2,5,10,20", "experts": "2,4,8", "optimizer": "omoe,plain,adamw",
                                    "seeds": "1,2"}, "flags")
    cells = sweep.expand([grid], ["--task", "trec"], world_size=2)
    omoe = [c for c in cells if c.optimizer == "omoe"]
    plain = [c for c in cells if c.optimizer != "omoe"]
    assert len(omoe) == 4 * 3 * 2 and len(plain) == 3 * 2  # plain ignores s; "plain" and "adamw" are one cell
    assert all(c.skip_step is None and c.alpha0 is None and c.base_optimizer == "adamw" for c in plain)
    assert {(c.experts, c.ep_size) for c in cells} == {(2, 2), (4, 2), (8, 2)}
    assert len({c.name for c in cells}) == len(cells)
    # defaults come from the ds config's omoe section; a grid file gives the same cells as the flags
    assert {c.alpha0 for c in omoe} == {1.0} and {c.lam for c in omoe} == {1.0}
    from_file = sweep.grid_from_mapping({"skip_step": [2, 5, 10, 20], "experts": [2, 4, 8],
                                         "optimizer": ["omoe", "plain", "adamw"], "seeds": [1, 2]}, "file")
    assert sweep.expand([from_file], ["--task", "trec"], world_size=2) == cells
    assert [c.ep_size for c in sweep.expand([grid], ["--task", "trec"], world_size=4) if c.seed == 1 and
            c.optimizer != "omoe"] == [2, 4, 4]
    # Table VIII: each base optimizer with and without OMoE
    opt = sweep.grid_from_mapping({"base_optimizer": "adamw,rmsprop,adagrad", "optimizer": "omoe,plain"}, "flags")
    names = [c.name for c in sweep.expand([opt], [], world_size=2)]
    assert names == ["omoe-adamw_M4_ep2_s5_a1_lam1_seed42", "omoe-rmsprop_M4_ep2_s5_a1_lam1_seed42",
                     "omoe-adagrad_M4_ep2_s5_a1_lam1_seed42", "adamw_M4_ep2_seed42", "rmsprop_M4_ep2_seed42",
                     "adagrad_M4_ep2_seed42"]


# --------------------------------------------------------------------------------- real launches

@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_bert, tiny_data, tiny_ds_config):
    """One sweep of 3 real launches (4 steps each on 2 ranks): first a cell that fails inside the job (OMoE
    refuses a ZeRO-3 config), then OMoE (s=2) and its AdamW baseline."""
    root = tmp_path_factory.mktemp("sweep")
    zero3 = json.loads(open(tiny_ds_config).read())
    zero3["zero_optimization"] = {"stage": 3}
    (root / "zero3.json").write_text(json.dumps(zero3))
    grid = [{"optimizer": ["omoe"], "skip_step": [2], "seeds": [7],
             "train_args": ["--deepspeed_config", str(root / "zero3.json")]},
            {"optimizer": ["omoe", "adamw"], "skip_step": [2], "seeds": [7]}]
    (root / "grid.json").write_text(json.dumps(grid))
    results = root / "results"
    flags = tiny_train_flags(tiny_bert, tiny_data, tiny_ds_config)
    rc = sweep.main(["--results-dir", str(results), "--grid", str(root / "grid.json"), "--", *flags])
    # the same two good cells by axis flags, as a re-run would give them
    return {"results": results, "rc": rc, "flags": flags,
            "axes": ["--skip-step", "2", "--experts", "4", "--optimizer", "omoe,adamw", "--seeds", "7"]}


GOOD_CELLS = ["omoe-adamw_M4_ep2_s2_a1_lam1_seed7", "adamw_M4_ep2_seed7"]


@pytest.mark.distributed
def test_sweep_runs_cells_and_records_them(finished_sweep):
    results = finished_sweep["results"]
    for name in GOOD_CELLS:
        d = results / "cells" / name
        r = json.loads((d / "results.json").read_text())
        cell = json.loads((d / "cell.json").read_text())
        assert r["seed"] == 7 and r["steps"] == 4 and r["world_size"] == 2
        assert r["config"]["args"]["experts"] == 4 and r["config"]["args"]["ep_size"] == 2
        assert cell["seed"] == 7 and cell["command"][0].endswith("deepspeed") and "--overwrite" not in cell["command"]
        assert cell["train_args"] == finished_sweep["flags"]
        assert (d / "metrics.jsonl").exists() and (d / "train.log").stat().st_size > 0
    omoe = json.loads((results / "cells" / GOOD_CELLS[0] / "results.json").read_text())
    assert omoe["optimizer"] == "omoe" and omoe["config"]["deepspeed"]["omoe"]["skip_step"] == 2
    assert omoe["o_steps"] == 1  # steps 0..3: step 2 is the O step
    assert (omoe["timed_r_steps"], omoe["timed_o_steps"]) == (3, 1) and omoe["projector_bytes_per_rank"] > 0
    plain = json.loads((results / "cells" / GOOD_CELLS[1] / "results.json").read_text())
    assert (plain["timed_r_steps"], plain["timed_o_steps"], plain["o_step_s"]) == (4, 0, None)
    assert plain["projector_bytes_per_rank"] == 0 and plain["peak_rss_bytes_per_rank"] > 0
    assert [e["status"] for e in events(results)][1:] == ["finished", "finished"]


@pytest.mark.distributed
def test_a_failed_cell_is_recorded_and_the_sweep_goes_on(finished_sweep):
    results = finished_sweep["results"]
    assert finished_sweep["rc"] == 1  # some cell failed; every cell was tried
    failed, *finished = events(results)
    assert failed["status"] == "failed" and failed["cell"].startswith("omoe-adamw_M4_ep2_s2_a1_lam1_seed7_x")
    assert failed["returncode"] != 0 and failed["error"] == f"exit code {failed['returncode']}"
    assert any("ZeRO-3" in line for line in failed["log_tail"]), failed["log_tail"]
    assert [(e["cell"], e["status"]) for e in finished] == [(n, "finished") for n in GOOD_CELLS]
    status = json.loads((results / "status.json").read_text())
    assert {n: s["status"] for n, s in status.items()} == {failed["cell"]: "failed", **{n: "finished" for n in GOOD_CELLS}}
    assert "log_tail" not in status[failed["cell"]] and status[failed["cell"]]["returncode"] == failed["returncode"]


@pytest.mark.distributed
def test_rerun_skips_finished_cells_and_redoes_a_half_finished_one(finished_sweep, tmp_path):
    axes, flags = finished_sweep["axes"], finished_sweep["flags"]
    results = tmp_path / "results"
    shutil.copytree(finished_sweep["results"], results)
    (results / "sweep.jsonl").unlink()
    omoe_dir, base_dir = (results / "cells" / n for n in GOOD_CELLS)
    mtimes = {d: (d / "results.json").stat().st_mtime_ns for d in (omoe_dir, base_dir)}

    assert run_sweep(results, axes, flags) == 0  # nothing to do: no launch
    assert [(e["cell"], e["status"]) for e in events(results)] == [(n, "skipped") for n in GOOD_CELLS]
    assert all((d / "results.json").stat().st_mtime_ns == t for d, t in mtimes.items())

    (omoe_dir / "results.json").unlink()  # interrupted after its dev eval: metrics.jsonl is there
    assert (omoe_dir / "metrics.jsonl").exists()
    assert run_sweep(results, axes, flags) == 0
    assert [(e["cell"], e["status"]) for e in events(results)[2:]] == \
        [(omoe_dir.name, "finished"), (base_dir.name, "skipped")]
    assert "--overwrite" in json.loads((omoe_dir / "cell.json").read_text())["command"]
    assert json.loads((omoe_dir / "results.json").read_text())["o_steps"] == 1
    assert len((omoe_dir / "metrics.jsonl").read_text().splitlines()) == 1  # the old run's line was replaced
    assert (base_dir / "results.json").stat().st_mtime_ns == mtimes[base_dir]

    # the same results dir with another budget would mix runs: refused up front, nothing launched
    other = list(flags)
    other[other.index("--max-steps") + 1] = "5"
    assert run_sweep(results, axes, other) == 2
    assert len(events(results)) == 4


# ---------------------------------------------------------------------------------------------- report

def assert_valid_png(path, size):
    from PIL import Image
    import matplotlib.image
    data = open(path, "rb").read()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == size, (path, im.size)
    assert matplotlib.image.imread(path).shape[:2] == (size[1], size[0])


@pytest.mark.distributed
def test_report_on_a_real_sweep(finished_sweep, tmp_path):
    results = finished_sweep["results"]
    lines = []
    out = report.write_report(str(results), str(tmp_path), dpi=50, echo=lines.append)
    md = open(out["markdown"]).read()
    assert "| OMoE/adamw | 4 | 2 | 2 |" in md and "| adamw | 4 | 2 | – |" in md
    assert sorted(os.path.basename(p) for p in out["plots"]) == ["optimizers.png", "per_layer_diversity.png"]
    assert_valid_png(tmp_path / "per_layer_diversity.png", (450, 300))
    # one s and one M: Fig. 4 and Fig. 5 have no data, and say so
    assert [line.split(" (")[0] for line in out["skipped"]] == ["skipped skip_step.png", "skipped experts_gain.png",
                                                                 "skipped experts_scaling.png"]
    assert all(any(skip in line for line in lines) for skip in out["skipped"])
    assert not (tmp_path / "skip_step.png").exists()
    assert out["failed"] == [e["cell"] for e in events(results) if e["status"] == "failed"]
    assert "## Failed cells" in md and "ZeRO-3" in md


def synthetic_results(optimizer, base, experts, skip, seed, score, variance):
    layers = [{"w1": {"percent_differing": 40 + 10 * variance / 1e-6 + l, "param_variance": variance * (1 + 0.1 * l)},
               "w2": {"percent_differing": 30 + 10 * variance / 1e-6 + l, "param_variance": variance * (1 - 0.1 * l)},
               "output_variance": 1e-5} for l in range(3)]
    per_layer = [{"w1": d["w1"]["param_variance"], "w2": d["w2"]["param_variance"],
                  "mean": (d["w1"]["param_variance"] + d["w2"]["param_variance"]) / 2} for d in layers]
    steps, omoe = 100, optimizer == "omoe"
    r_step = 0.1 + 0.01 * experts  # step time and memory grow with M; an O step costs 1.5 R steps
    return {"task": "trec", "primary_metric": "accuracy", "model": "minilm-l6", "optimizer": optimizer,
            "base_optimizer": base, "seed": seed, "steps": steps, "world_size": 2, "train_seconds": 200.0,
            "o_steps": steps // skip if omoe else 0, "dev": {"accuracy": score + 0.02},
            "r_step_s": r_step, "o_step_s": 1.5 * r_step if omoe else None,
            "o_step_extra_s": 0.5 * r_step if omoe else None,
            "peak_rss_bytes_per_rank": (500 + 10 * experts + seed) * 2 ** 20,
            "projector_bytes_per_rank": experts * 2 ** 19 if omoe else 0,
            "projector_dense_bytes_per_rank": experts * 2 ** 21 if omoe else 0,
            "test": {"accuracy": score},
            "diversity": {"expert_param_variance": per_layer, "layers": layers, "overall": {}},
            "mean_expert_param_variance": sum(d["mean"] for d in per_layer) / 3,
            "config": {"args": {"lr": 1e-4, "experts": experts, "ep_size": 2}, "deepspeed": {}}}


def write_synthetic_sweep(root):
    """OMoE at s in {2,5,10} and M in {2,4,8} for AdamW, RMSprop and Adagrad at (s=5, M=4), 2 seeds each, plus one
    failed cell: every plot has data."""
    for seed in (1, 2):
        cells = [sweep.Cell("omoe", "adamw", 4, 2, seed, s, 1.0, 1.0) for s in (2, 5, 10)]
        cells += [sweep.Cell("omoe", "adamw", m, 2, seed, 5, 1.0, 1.0) for m in (2, 8)]
        cells += [sweep.Cell("omoe", base, 4, 2, seed, 5, 1.0, 1.0) for base in ("rmsprop", "adagrad")]
        cells += [sweep.Cell("adamw", "adamw", m, 2, seed) for m in (2, 4, 8)]
        cells += [sweep.Cell(base, base, 4, 2, seed) for base in ("rmsprop", "adagrad")]
        for c in cells:
            d = root / "cells" / c.name
            d.mkdir(parents=True)
            omoe = c.optimizer == "omoe"
            score = 0.80 + 0.004 * seed + 0.01 * omoe * (c.experts / 4) + (0.005 if omoe and c.skip_step == 5 else 0)
            variance = 5e-7 * (1 + (0.5 / c.skip_step if omoe else 0))
            (d / "results.json").write_text(json.dumps(synthetic_results(c.optimizer, c.base_optimizer, c.experts,
                                                                         c.skip_step or 1, seed, score, variance)))
            (d / "cell.json").write_text(json.dumps({"cell": c.name, **c.axes(), "train_args": []}))
    (root / "sweep.jsonl").write_text(json.dumps({"cell": "sgd_M4_ep2_seed1", "status": "failed",
                                                  "error": "exit code 1", "log_tail": ["RuntimeError: boom"]}) + "\n")
    (root / "cells" / "sgd_M4_ep2_seed1").mkdir()


def test_report_writes_table_and_every_plot(tmp_path):
    results = tmp_path / "results"
    write_synthetic_sweep(results)
    assert report.main([str(results)]) == 0
    out = results / "report"
    md = (out / "report.md").read_text()
    for png, size in (("skip_step.png", (900, 360)), ("experts_gain.png", (900, 360)), ("experts_scaling.png", (900, 640)),
                      ("optimizers.png", (680, 380)), ("per_layer_diversity.png", (900, 600))):
        assert_valid_png(out / png, size)
        assert f"]({png})" in md
    # mean ± std over the 2 seeds: scores 0.804 and 0.808 (+0.01 OMoE gain at M=4, +0.005 at s=5)
    assert "| OMoE/adamw | 4 | 2 | 5 | 1 | 1 | 1,2 | 84.10 ± 0.28 | 82.10 ± 0.28 |" in md
    assert "| adamw | 4 | 2 | – | – | – | 1,2 | 82.60 ± 0.28 | 80.60 ± 0.28 |" in md
    assert "| 8 | 2 | 80.60 ± 0.28 | 83.10 ± 0.28 | 2.50 ± 0.00 |" in md  # Fig. 5 row: gain 0.01·8/4 + 0.005
    assert "`sgd_M4_ep2_seed1`: exit code 1" in md and "Plots skipped" not in md
    # expert-count scaling, M=8: R step 0.18 s, O step 0.27 s (+0.09, ×1.5); RSS 580 + seed MiB; projectors 4 / 16 MiB
    assert "| 8 | 2 | adamw | 82.60 ± 0.28 | 80.60 ± 0.28 | 5.000e-07 ± 0.0e+00 | 0.180 ± 0.000 | – | – | – | " \
           "582 ± 1 | 0 | – |" in md
    assert "| 8 | 2 | OMoE/adamw | 85.10 ± 0.28 | 83.10 ± 0.28 | 5.500e-07 ± 0.0e+00 | 0.180 ± 0.000 | 0.270 ± 0.000 | " \
           "0.090 ± 0.000 | 1.50 ± 0.00 | 582 ± 1 | 4.0 ± 0.0 | 16.0 ± 0.0 |" in md


def test_expert_scaling_plot_is_skipped_for_results_without_step_timing(tmp_path):
    """Results written before the job recorded step timing and memory: Fig. 5 is drawn, the scaling plot is not."""
    results = tmp_path / "results"
    write_synthetic_sweep(results)
    for path in (results / "cells").glob("*/results.json"):
        r = json.loads(path.read_text())
        r.pop("r_step_s")
        path.write_text(json.dumps(r))
    lines = []
    out = report.write_report(str(results), str(tmp_path / "report"), dpi=50, echo=lines.append)
    assert "experts_gain.png" in [os.path.basename(p) for p in out["plots"]]
    assert [line.split(" (")[0] for line in out["skipped"]] == ["skipped experts_scaling.png"]
    assert "r_step_s" in out["skipped"][0] and any(out["skipped"][0] in line for line in lines)
    assert not (tmp_path / "report" / "experts_scaling.png").exists()


def test_report_refuses_a_directory_without_cells(tmp_path):
    with pytest.raises(SystemExit, match="no cells/ directory"):
        report.main([str(tmp_path)])
