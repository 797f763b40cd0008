"""Paper B's comparison over seeds, one task: full fine-tuning vs lora vs moe-lora vs omoe-lora; prints one JSON
object (mean ± std over seeds).

    python bench/lora_seeds.py --task trec --seeds 42 1 2 --epochs 1 --max-length 24

Each (adapter, seed) is a real `deepspeed` launch of omoe_ds.train on 2 CPU ranks under ZeRO-2 with AdamW
(the dense MiniLM-L6; adapters at the defaults: r 16, α 32, 4 experts, soft routing, dropout 0.05, on the
attention and FFN linears). Full fine-tuning takes --full-lr, the adapters --lr. A run whose results.json
exists under --runs-dir is reused.
"""
import argparse
import json
import os

from seed_runs import ROOT, mean_std, train_run

ADAPTERS = ("full", "lora", "moe-lora", "omoe-lora")


def run(adapter, seed, args) -> dict:
    budget = ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
    flags = ["--model", args.model, "--task", args.task, "--adapter", adapter,
             "--deepspeed_config", "ds_configs/finetune_zero2.json", *budget, "--max-length", str(args.max_length),
             "--lr", str(args.full_lr if adapter == "full" else args.lr), "--seed", str(seed)]
    return train_run(os.path.join(args.runs_dir, f"{args.task}_{adapter}_seed{seed}"), flags, args.master_port)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="trec")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=ADAPTERS)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-length", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-4, help="adapters (paper B's setting)")
    p.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs"))
    p.add_argument("--master-port", type=int, default=29660)
    args = p.parse_args()
    report = {"task": args.task, "model": args.model, "seeds": args.seeds, "ranks": 2, "zero_stage": 2,
              "budget": {"epochs": args.epochs, "max_steps": args.max_steps, "max_length": args.max_length,
                         "lr": args.lr, "full_lr": args.full_lr}}
    for adapter in args.adapters:
        runs = [run(adapter, seed, args) for seed in args.seeds]
        metric = runs[0]["primary_metric"]
        entry = {f"test_{metric}": mean_std([r["test"][metric] for r in runs]),
                 f"dev_{metric}": mean_std([r["dev"][metric] for r in runs]),
                 "trainable_share": runs[0]["trainable_share"], "steps": runs[0]["steps"],
                 "train_seconds": mean_std([r["train_seconds"] for r in runs])}
        if "lora_diversity" in runs[0]:  # the mixtures' mean |cos| on dev: experts' outputs e, representations u
            for which in ("expert_cosine", "representation_cosine"):
                entry[f"{which}_mean_abs"] = mean_std([r["lora_diversity"]["summary"][which]["mean_abs"] for r in runs])
        report[adapter] = entry
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
