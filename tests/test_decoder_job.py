"""omoe_ds.train on the real SmolLM2-135M, 2 CPU ranks under ZeRO-3: upcycled to Mixtral in two layers and
sharded by DeepSpeed AutoEP (EP = 2) with O steps; and with an omoe-lora adapter on the dense decoder."""
import csv
import json
import os
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from omoe_ds.core.environment import free_local_port
from omoe_ds.finetune import models
from omoe_ds.finetune.train import ADAPTER_DIR
from omoe_ds.lora.io import CONFIG_NAME, WEIGHTS_NAME
import launching

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.decoder, pytest.mark.distributed]
MAX_LENGTH, MICRO = 16, 4


def run_job(data, tmp_path, name, config_name, *flags):
    ds = json.load(open(os.path.join(ROOT, "ds_configs", config_name)))
    ds["train_micro_batch_size_per_gpu"] = MICRO
    if "omoe" in ds:
        ds["omoe"]["skip_step"] = 3
    config, out = tmp_path / f"{name}.json", tmp_path / name
    config.write_text(json.dumps(ds))
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_local_port()), "--module", "omoe_ds.train", "--model", "smollm2-135m",
           "--task", "csv", "--data-dir", data, "--text-cols", "text", "--label-col", "label",
           "--max-length", str(MAX_LENGTH), "--eval-batch-size", "16", "--output-dir", str(out),
           "--deepspeed_config", str(config), *flags]
    proc = launching.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                         timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return out, json.load(open(out / "results.json"))


@pytest.fixture(scope="module")
def data(tiny_data):
    models.smollm2_135m_path()  # dequantised here, once, before two ranks would wait on its lock
    return tiny_data


def test_upcycled_smollm2_trains_through_autoep_at_zero3_with_o_steps(data, tmp_path):
    out, results = run_job(data, tmp_path, "autoep_z3", "finetune_autoep_zero3.json", "--experts", "4", "--ep-size", "2",
                           "--expert-parallel", "autoep", "--moe-layers", "0,1", "--max-steps", "4")
    assert results["steps"] == 4 and results["o_steps"] == 1  # skip_step 3: step 3 is the O step
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(np.isfinite(r["train_loss"]) for r in records)
    layers = results["diversity"]["layers"]
    assert len(layers) == 2 and all(set(layer) >= {"gate", "up", "down", "output_variance"} for layer in layers)
    # Every real dev token is routed once (top-1) and padding nowhere, though AutoEP's router sees both.
    tokenizer = AutoTokenizer.from_pretrained(models.smollm2_135m_path())
    with open(os.path.join(data, "dev.csv")) as f:
        dev = [row["text"] for row in csv.DictReader(f)]
    real_tokens = int(tokenizer(dev, truncation=True, max_length=MAX_LENGTH, padding="max_length",
                                return_tensors="pt")["attention_mask"].sum())
    assert [sum(layer["tokens"]) for layer in results["diversity"]["dev_expert_load"]] == [real_tokens] * 2
    assert results["config"]["deepspeed"]["expert_parallel"]["autoep_size"] == 2


def test_omoe_lora_on_smollm2_at_zero3(data, tmp_path):
    out, results = run_job(data, tmp_path, "olora_z3", "finetune_zero3.json", "--adapter", "omoe-lora", "--lr", "2e-4",
                           "--max-steps", "3")
    assert results["steps"] == 3 and results["adapter"] == "omoe-lora"
    assert 0 < results["trainable_share"] < 0.2
    modules = results["lora_diversity"]["modules"]
    assert len(modules) == 30 * 7  # q, k, v, o, gate, up, down of every layer
    assert (out / ADAPTER_DIR / CONFIG_NAME).is_file() and (out / ADAPTER_DIR / WEIGHTS_NAME).is_file()
    assert np.isfinite(results["dev"]["accuracy"])
