"""bench/expert_scaling.py --merge: split launches' reports become the one report a single launch would print."""
import importlib.util
import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "expert_scaling.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("expert_scaling", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(BENCH))
    spec.loader.exec_module(module)
    return module


def entry(M, **sides):
    first = next(iter(sides))
    return {"num_experts": M, **sides[first], "by_side": sides}


def side(r, o):
    return {"r_step_s": r, "o_step_s": o, "o_step_extra_s": o - r, "o_step_grad_projection_s": (o - r) / 2}


def report(t_first, by_t):
    return {"machine": "m", "shapes": {"d_model": 384, "d_ff": 1536, "num_layers": 2, "tokens_per_rank": 4096},
            "o_steps_before": t_first, "by_o_steps_before": by_t}


def test_merge_pools_sides_and_recomputes_ratios(tmp_path):
    bench = load_bench()
    small = report(200, {"200": [entry(16, auto=side(2.0, 3.0), gradient=side(2.0, 3.5)),
                                 entry(4, auto=side(1.0, 1.25), gradient=side(1.0, 1.5), token=side(1.0, 2.0))],
                         "0": [entry(4, auto=side(1.0, 0.9))]})
    big = report(200, {"200": [entry(64, auto=side(5.0, 6.0))], "0": [entry(64, auto=side(5.0, 4.5))]})
    forced = report(200, {"200": [entry(64, gradient=side(5.0, 9.0))]})
    # the gradient-only launch listed first: the M = 64 entry still takes auto's figures
    merged = bench.merge([forced, small, big])
    by_m = {e["num_experts"]: e for e in merged["by_experts"]}
    assert [e["num_experts"] for e in merged["by_experts"]] == [4, 16, 64]
    assert by_m[64]["o_step_s"] == 6.0 and set(by_m[64]["by_side"]) == {"auto", "gradient"}
    assert by_m[64]["o_step_extra_over_first"] == (6.0 - 5.0) / 0.25
    assert by_m[64]["auto_over_cheaper_forced_o_step"] == 6.0 / 9.0
    assert by_m[4]["auto_over_cheaper_forced_o_step"] == 1.25 / 1.5
    assert [e["num_experts"] for e in merged["by_o_steps_before"]["0"]] == [4, 64]

    paths = []
    for i, r in enumerate((small, big, forced)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    png = tmp_path / "fig.png"
    printed = subprocess.run([sys.executable, BENCH, "--merge", *map(str, paths), "--plot", str(png)],
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(printed)["by_experts"] == merged["by_experts"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

