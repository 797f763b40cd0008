"""Side-by-side table of fine-tuning runs from their results.json files.

    python -m omoe_ds.compare runs/trec_adamw runs/trec_omoe
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List


def load_results(run_dir: str) -> dict:
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: did the run in {run_dir} finish?")
    with open(path) as f:
        return json.load(f)


def table(results: List[dict]) -> str:
    metric = results[0]["primary_metric"]
    header = f"{'optimizer':<10}{'dev ' + metric:>16}{'test ' + metric:>16}{'train s':>9}{'expert var':>12}{'steps':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        test = r.get("test", {}).get(metric)
        name = r["optimizer"] if r["optimizer"] != "omoe" else f"omoe/{r['base_optimizer']}"
        lines.append(f"{name:<10}{r['dev'][metric]:>16.4f}{(f'{test:.4f}' if test is not None else '-'):>16}"
                     f"{r['train_seconds']:>9.0f}{r['mean_expert_param_variance']:>12.3e}{r['steps']:>7}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args(argv)
    results = [load_results(d) for d in args.run_dirs]
    r0 = results[0]
    print(f"\n{r0['task']} · {r0['model']} · {r0['world_size']} ranks · seed {r0['seed']}")
    print(table(results))


if __name__ == "__main__":
    main()
