"""AdamW vs OMoE fine-tuning over seeds, one task; prints one JSON object (mean ± std over seeds).

    python bench/finetune_seeds.py --task trec --seeds 42 1 2 --epochs 1 --max-length 24
    python bench/finetune_seeds.py --task banking77 --seeds 1 2 3 --max-steps 120 --max-length 32

Each (optimizer, seed) is a real `deepspeed` launch of omoe_ds.train on 2 ranks, EP=2, ZeRO-2, 4
experts per layer of MiniLM-L6; a run whose results.json exists under --runs-dir is reused.
"""
import argparse
import json
import os

from seed_runs import ROOT, mean_std, train_run


def run(task, optimizer, seed, args) -> dict:
    budget = ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
    flags = ["--model", args.model, "--task", task, "--experts", "4", "--ep-size", "2", "--optimizer", optimizer,
             "--deepspeed_config", "ds_configs/finetune_zero2.json", *budget, "--max-length", str(args.max_length),
             "--lr", str(args.lr), "--seed", str(seed)]
    return train_run(os.path.join(args.runs_dir, f"{task}_{optimizer}_seed{seed}"), flags, args.master_port)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="trec")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-length", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs"))
    p.add_argument("--master-port", type=int, default=29650)
    args = p.parse_args()
    report = {"task": args.task, "model": args.model, "seeds": args.seeds, "ranks": 2, "ep_size": 2, "experts": 4,
              "budget": {"epochs": args.epochs, "max_steps": args.max_steps, "max_length": args.max_length, "lr": args.lr}}
    for optimizer in ("adamw", "omoe"):
        runs = [run(args.task, optimizer, seed, args) for seed in args.seeds]
        metric = runs[0]["primary_metric"]
        report[optimizer] = {
            f"test_{metric}": mean_std([r["test"][metric] for r in runs]),
            f"dev_{metric}": mean_std([r["dev"][metric] for r in runs]),
            "expert_param_variance": mean_std([r["mean_expert_param_variance"] for r in runs]),
            "train_seconds": mean_std([r["train_seconds"] for r in runs]),
            "steps": runs[0]["steps"], "o_steps": runs[0]["o_steps"]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
