"""The fine-tuning job's --adapter paths (paper B through omoe_ds.train): bad adapter flags refused before any
compute; omoe-lora trained by SGD with momentum on 2 ranks under ZeRO-2 and under ZeRO-3 equal to 1 process
on the same global batches; the adapter the job writes, loaded alone onto the base, gives the job's dev metric."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omoe_ds import OMoEConfigError
from omoe_ds.core.environment import free_local_port
from omoe_ds.finetune.train import ADAPTER_DIR, main
import launching
from tiny_job import save_tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.lora


@pytest.fixture(scope="module")
def dropless_bert(tmp_path_factory):
    """tiny_bert without dropout, so runs on 1 and 2 ranks compute the same function."""
    return save_tiny_bert(tmp_path_factory.mktemp("dropless_bert"), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)


def adapter_args(model, data, out, *extra):
    return ["--model", model, "--task", "csv", "--data-dir", data, "--text-cols", "text", "--label-col", "label",
            "--max-length", "16", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("flags,match", [
    (["--adapter", "omoe-lora", "--experts", "4"], r"--adapter omoe-lora with --experts.*keep the model dense"),
    (["--adapter", "lora", "--optimizer", "omoe"], r"--adapter lora with --optimizer omoe"),
    (["--adapter", "moe-lora", "--ep-size", "2"], r"--adapter moe-lora with --ep-size"),
    (["--lora-r", "8"], r"--lora-r sets a LoRA adapter: add --adapter"),
    (["--adapter", "full", "--lora-experts", "2"], r"--lora-experts with --adapter full"),
    (["--adapter", "omoe-lora", "--lora-r", "0"], r"r=0: the LoRA rank must be a positive integer"),
    (["--adapter", "moe-lora", "--lora-experts", "1"], r"num_experts=1: a mixture \(moe-lora\) needs at least 2"),
    (["--adapter", "omoe-lora", "--lora-routing", "topk", "--lora-top-k", "5"], r"top_k=5: must lie in \[1, num_exp"),
    (["--adapter", "omoe-lora", "--lora-targets", "query,nosuchmodule"], r"nosuchmodule"),
])
def test_bad_adapter_flags_are_refused_before_any_compute(tiny_bert, tiny_data, tmp_path, flags, match):
    with pytest.raises(OMoEConfigError, match=match):
        main(adapter_args(tiny_bert, tiny_data, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def launch(tmp_path, name, ranks, stage, micro, *job_flags):
    """omoe_ds.train through the deepspeed CLI on `ranks` CPU ranks at ZeRO `stage`; its output dir."""
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "finetune_zero3.json" if stage == 3 else
                                      "finetune_zero2.json")))
    ds["train_micro_batch_size_per_gpu"] = micro
    ds.pop("omoe", None)
    config, out = tmp_path / f"{name}.json", tmp_path / name
    config.write_text(json.dumps(ds))
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
           "--master_port", str(free_local_port()), "--module", "omoe_ds.train", *job_flags,
           "--output-dir", str(out), "--deepspeed_config", str(config)]
    proc = launching.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                         timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.mark.distributed
def test_omoe_lora_job_two_ranks_zero2_and_zero3_equal_one_process(dropless_bert, tiny_data, tmp_path):
    # The same 8-row global batches: 1 rank × 8, or 2 ranks × 4 (the sampler's strided shards of one permutation).
    flags = ["--model", dropless_bert, "--task", "csv", "--data-dir", tiny_data, "--text-cols", "text",
             "--label-col", "label", "--max-length", "16", "--adapter", "omoe-lora", "--lora-r", "4",
             "--lora-dropout", "0", "--optimizer", "sgd", "--lr", "5e-2", "--max-steps", "8", "--eval-every", "4"]
    reference = launch(tmp_path, "one", 1, 2, 8, *flags)
    runs = {stage: launch(tmp_path, f"two_zero{stage}", 2, stage, 4, *flags) for stage in (2, 3)}
    expected = load_file(reference / ADAPTER_DIR / "adapter_model.safetensors")
    reference_result = json.loads((reference / "results.json").read_text())
    for stage, out in runs.items():
        got = load_file(out / ADAPTER_DIR / "adapter_model.safetensors")
        assert got.keys() == expected.keys()
        for name in expected:
            # fp32 gradient sums in another order (2 shards, ZeRO-3's reduce-scatter): ~1e-7 relative per step,
            # 8 steps of lr 5e-2 on O(1) entries stay well inside 1e-6.
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6,
                                       msg=lambda m: f"ZeRO-{stage} {name}: {m}")
        result = json.loads((out / "results.json").read_text())
        assert result["adapter"] == "omoe-lora" and result["optimizer"] == "sgd" and result["steps"] == 8
        # The diversity figures of the same weights on the same dev tokens, every rank measuring the same batches.
        summary, expected_summary = result["lora_diversity"]["summary"], reference_result["lora_diversity"]["summary"]
        assert summary["modules"] == 12 and summary["tokens"] == expected_summary["tokens"] > 0
        for key in ("mean", "mean_abs"):
            assert summary["expert_cosine"][key] == pytest.approx(expected_summary["expert_cosine"][key], abs=1e-5)
        assert summary["load"] == pytest.approx(expected_summary["load"], abs=1e-6)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [4, 8] and all("lora_diversity" in r for r in records)
    # The adapter trained: its B factors, zero at init, moved.
    assert all(expected[name].abs().max() > 0 for name in expected if name.endswith("lora_B"))
    check_adapter_reloads(dropless_bert, tiny_data, runs[3])
    check_pca_command(runs[2], runs[3], tmp_path)


def check_pca_command(run_a, run_b, tmp_path):
    """omoe_ds.lora_pca rebuilds each run's model from its results.json and adapter/: the same LoRA diversity as
    the job measured on the same dev batches, and a PNG with one panel per run."""
    from omoe_ds.lora import lora_diversity
    from omoe_ds.studies import lora_pca
    _, model, batches = lora_pca.run_model(str(run_b))
    want = json.loads((run_b / "results.json").read_text())["lora_diversity"]["summary"]
    got = lora_diversity(model, batches)["summary"]
    assert got["tokens"] == want["tokens"]
    for which in ("expert_cosine", "representation_cosine"):
        assert got[which]["mean_abs"] == pytest.approx(want[which]["mean_abs"], abs=1e-6)
    png = tmp_path / "pca.png"
    assert lora_pca.main([str(run_a), str(run_b), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lora_pca.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2  # not a run: one clear error


def check_adapter_reloads(base, data, out):
    """The saved adapter on a fresh base model, in one process without DeepSpeed, scores the job's dev accuracy."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from omoe_ds.finetune.features import encode_task, evaluate_predictions, model_input_columns
    from omoe_ds.finetune.tasks import load_task
    from omoe_ds.lora import load_adapter
    spec, raw = load_task("csv", data, ["text"], "label")
    tokenizer = AutoTokenizer.from_pretrained(base)
    encoded = encode_task(spec, raw, tokenizer, 16)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=spec.num_labels,
                                                               ignore_mismatched_sizes=True)
    load_adapter(model, out / ADAPTER_DIR)
    model.eval()
    columns = model_input_columns(encoded["dev"])
    batch = encoded["dev"].with_format("torch", columns=[c for c in columns if c != "labels"])[:]
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    figures = evaluate_predictions(spec, raw["dev"], encoded["dev"], {"logits": logits.astype(np.float32)})
    assert figures == json.loads((out / "results.json").read_text())["dev"]
