"""Paper B's Fig. 1 for finished runs: a 2-D PCA of one adapted module's expert representations on dev tokens,
one panel per run (e.g. moe-lora vs omoe-lora trained alike). Each run's base model, task and tokenisation are
rebuilt from its results.json, and its saved adapter/ is loaded onto it; one process, no DeepSpeed.

    python -m omoe_ds.lora_pca runs/trec_moe-lora_seed42 runs/trec_omoe-lora_seed42 --out pca.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..core.config import OMoEConfigError


def run_model(run_dir: str):
    """(label, the run's model with its adapter loaded, eval mode; dev batches the job measured diversity on)."""
    from transformers import AutoTokenizer
    from ..finetune.features import encode_task
    from ..finetune.models import resolve_model_path
    from ..finetune.tasks import load_task
    from ..finetune.train import ADAPTER_DIR, load_pretrained, lora_dev_sample, record_trained_head
    from ..lora import load_adapter
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise OMoEConfigError(f"{run_dir}: no results.json; pass the --output-dir of a finished omoe_ds.train run")
    results = json.load(open(path))
    args = results["config"]["args"]
    if not os.path.isfile(os.path.join(run_dir, ADAPTER_DIR, "adapter_config.json")):
        raise OMoEConfigError(f"{run_dir}: no {ADAPTER_DIR}/ (the run used --adapter {results.get('adapter')}); "
                              "the plot needs a moe-lora or omoe-lora run")
    split = lambda value: value.split(",") if value else None  # noqa: E731
    spec, raw = load_task(args["task"], args["data_dir"], split(args["text_cols"]), args["label_col"],
                          head=args["head"], label_names=split(args["label_names"]))
    model_path = resolve_model_path(args["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dev = encode_task(spec, {"dev": raw["dev"]}, tokenizer, args["max_length"])["dev"]
    model = record_trained_head(load_pretrained(spec, model_path), spec)
    load_adapter(model, os.path.join(run_dir, ADAPTER_DIR))
    return f"{results['adapter']} (seed {results['seed']})", model.eval(), lora_dev_sample(dev, args["eval_batch_size"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="--output-dir of finished moe-lora / omoe-lora runs")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--module", default=None, help="adapted module name (default: the middle mixture module)")
    p.add_argument("--which", default="representations", choices=["representations", "expert_outputs"],
                   help="u, the orthogonalised outputs that are mixed, or e, the experts' outputs before it")
    args = p.parse_args(argv)
    from ..lora import plot_expert_pca
    try:
        loaded = [run_model(run) for run in args.runs]
        models = {label: model for label, model, _ in loaded}
        out, name = plot_expert_pca(models, loaded[0][2], args.out, module_name=args.module, which=args.which)
    except OMoEConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {name}, {', '.join(models)}")
    return 0
