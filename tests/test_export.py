"""omoe_ds.export: a DeepSpeed MoE checkpoint becomes one consolidated EP=1 save_pretrained directory that
loads back on any EP size without the engine, and a checkpoint that does not fit is refused with the file and
the mismatch named, the checkpoint left as it was.

The distributed tests train a tiny BERT MoE on 2 ranks at EP=2 (tests/export_worker.py), export it through the
CLI, load the export in this process at EP=1 and on 2 ranks at EP=2, and compare outputs with the engine's; the
same launch runs the training job on the real default model (minilm-l6) and exports and retrains that.
The error tests use a checkpoint saved by a one-process engine in this process.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import omoe_ds
from omoe_ds.checkpoint.export import export_checkpoint, is_export, load_exported, read_checkpoint, resolve_tag_dir
from omoe_ds.checkpoint.layout import COMPLETE_MARKER, EXPERT_INFIX, NON_EXPERT_FILE, CheckpointError
from omoe_ds.core.environment import free_local_port
from omoe_ds.finetune.convert import MoEConversionConfig, convert_to_moe

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from export_worker import TAG, encode, eval_outputs  # noqa: E402

import launching

TOL = 1e-6
CHILD_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------
# A checkpoint saved by a one-process engine (EP=1), for the round trip and the error cases


@pytest.fixture(scope="module")
def local_ckpt(tiny_bert, tmp_path_factory, single_process_group):
    """save_dir with tag "step2" (hf_model/ included) and the engine's eval outputs."""
    out = tmp_path_factory.mktemp("local_ckpt")
    torch.manual_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    convert_to_moe(model, MoEConversionConfig(num_experts=4, ep_size=1))
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 1}, "omoe": {"skip_step": 2}}
    engine = one_process_engine(model, torch.optim.AdamW(model.parameters(), lr=3e-3), config)
    for step in range(3):
        batch = encode(tokenizer, [f"the goal {step} {i}" for i in range(4)])
        engine.backward(engine(**batch, labels=torch.tensor([0, 1, 2, step % 3])).loss)
        engine.step()
    save_dir = out / "ckpt"
    engine.save_checkpoint(str(save_dir), tag="step2")
    engine.module.config.save_pretrained(save_dir / "step2" / "hf_model")
    tokenizer.save_pretrained(save_dir / "step2" / "hf_model")
    return {"save_dir": save_dir, "tag_dir": save_dir / "step2", "outputs": eval_outputs(engine.module, tokenizer),
            "tiny_bert": tiny_bert, "engine": engine, "tokenizer": tokenizer}


def one_process_engine(model, optimizer, config):
    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed's engine asks for it; the launches in this module set their own
    try:
        engine, *_ = omoe_ds.initialize(model=model, optimizer=optimizer, config=config)
    finally:
        del os.environ["LOCAL_RANK"]
    return engine


def snapshot(directory):
    """Every file under directory: (size, mtime_ns, sha256)."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            found[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, digest)
    return found


@pytest.fixture
def ckpt_copy(local_ckpt, tmp_path):
    """A private copy of the one-process checkpoint that a test may break before exporting it."""
    save_dir = tmp_path / "ckpt"
    shutil.copytree(local_ckpt["save_dir"], save_dir)
    return save_dir


def refused(ckpt, out, match, **kwargs):
    """Export must raise CheckpointError matching every pattern, change no file of ckpt, and leave no out."""
    before = snapshot(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError) as info:
            export_checkpoint(str(ckpt), str(out), **kwargs)
    message = str(info.value)
    for pattern in match:
        assert pattern in message, f"{pattern!r} not in: {message}"
    assert snapshot(ckpt) == before
    assert not os.path.exists(out) or not os.listdir(out)
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n]
    return message


def test_one_process_round_trip_equals_the_engine(local_ckpt, tmp_path):
    out = tmp_path / "export"
    before = snapshot(local_ckpt["save_dir"])
    with pytest.warns(UserWarning, match=COMPLETE_MARKER):
        export_checkpoint(str(local_ckpt["save_dir"]), str(out))
    assert snapshot(local_ckpt["save_dir"]) == before and is_export(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["omoe_moe"]["ep_size"] == 1 and config["omoe_moe"]["num_experts"] == 4
    assert config["omoe_export"]["source_tag"] == "step2" and config["omoe_export"]["global_steps"] == 3
    assert config["omoe_export"]["num_experts_per_layer"] == [4, 4]
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    model = load_exported(str(out))
    got = eval_outputs(model, AutoTokenizer.from_pretrained(str(out)))
    for key in ("logits", "hidden"):
        assert (got[key] - local_ckpt["outputs"][key]).abs().max().item() <= TOL


def test_loaded_export_trains_in_one_process(local_ckpt, tmp_path):
    out = export_checkpoint(str(local_ckpt["tag_dir"]), str(tmp_path / "export"))
    model = load_exported(out, bind_groups=False).train()
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 0}, "omoe": {"enabled": False}}
    engine = one_process_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    batch = encode(AutoTokenizer.from_pretrained(out), ["a b", "c d"])
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    engine.backward(engine(**batch, labels=torch.tensor([0, 1])).loss)
    engine.step()
    assert any(not torch.equal(before[n], p) for n, p in engine.module.named_parameters() if EXPERT_INFIX in n)


def tiny_model(model_type):
    import transformers as T
    small = dict(vocab_size=100, num_attention_heads=2)
    return {"roberta": (T.RobertaForTokenClassification, T.RobertaConfig(hidden_size=32, num_hidden_layers=2,
                                                                          intermediate_size=48, **small), (1,)),
            "albert": (T.AlbertForQuestionAnswering, T.AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=3,
                                                                     intermediate_size=48, **small), None),
            "distilbert": (T.DistilBertModel, T.DistilBertConfig(dim=32, n_layers=2, hidden_dim=48, vocab_size=100,
                                                                 n_heads=2), None),
            "mpnet": (T.MPNetForSequenceClassification, T.MPNetConfig(hidden_size=32, num_hidden_layers=2,
                                                                      intermediate_size=48, **small), None)}[model_type]


@pytest.mark.parametrize("model_type", ["roberta", "albert", "distilbert", "mpnet"])
def test_every_supported_model_type_round_trips(model_type, tmp_path, single_process_group):
    """Other heads, a layer subset (RoBERTa: layer 1 only), ALBERT's one shared MoE, a base model without head."""
    cls, config, layers = tiny_model(model_type)
    torch.manual_seed(0)
    model = convert_to_moe(cls(config), MoEConversionConfig(num_experts=2, layers=layers))
    engine = one_process_engine(model, torch.optim.SGD(model.parameters(), lr=0.5),
                                {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9,
                                 "zero_optimization": {"stage": 0}, "omoe": {"enabled": False}})
    ids = torch.randint(5, 100, (2, 7))
    engine.backward(engine(input_ids=ids, attention_mask=torch.ones_like(ids))[0].pow(2).mean())
    engine.step()
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="t")
    engine.module.config.save_pretrained(tmp_path / "ckpt" / "t" / "hf_model")  # no architectures: found from the keys
    with torch.no_grad():
        expected = engine.module.eval()(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [cls.__name__]
    assert config["omoe_export"]["num_moe_layers"] == (1 if model_type in ("roberta", "albert") else 2)
    with torch.no_grad():
        got = load_exported(str(tmp_path / "export"))(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
    assert (got - expected).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------------
# Checkpoints that do not fit, and outputs that must not be clobbered


def test_missing_expert_file_is_named(ckpt_copy, tmp_path):
    gone = ckpt_copy / "step2" / "layer_1_expert_2_mp_rank_00_model_states.pt"
    gone.unlink()
    refused(ckpt_copy, tmp_path / "out", [str(gone), "is missing", "MoE layer 1", "(2)"])


def test_expert_count_of_config_and_checkpoint_differ(ckpt_copy, tmp_path, local_ckpt):
    config_dir = tmp_path / "config8"
    config = json.loads((ckpt_copy / "step2" / "hf_model" / "config.json").read_text())
    config["omoe_moe"]["num_experts"] = 8
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(config))
    refused(ckpt_copy, tmp_path / "out", [str(ckpt_copy / "step2" / NON_EXPERT_FILE), "num_experts=[4, 4]",
                                          "num_experts=8", str(config_dir / "config.json")], config_dir=str(config_dir))


def test_more_expert_files_than_the_config_says(ckpt_copy, tmp_path):
    tag = ckpt_copy / "step2"
    for layer in (0, 1):
        for g in range(4, 8):  # files of experts 4..7 (contents do not matter: counts are checked first)
            shutil.copy(tag / f"layer_{layer}_expert_0_mp_rank_00_model_states.pt",
                        tag / f"layer_{layer}_expert_{g}_mp_rank_00_model_states.pt")
    refused(ckpt_copy, tmp_path / "out", ["expert count mismatch", "8 expert files", "num_experts=4",
                                          str(tag / "hf_model" / "config.json")])


def test_another_head_is_an_architecture_mismatch(ckpt_copy, tmp_path):
    config_dir = tmp_path / "token_cls"
    config = json.loads((ckpt_copy / "step2" / "hf_model" / "config.json").read_text())
    config["architectures"] = ["BertForTokenClassification"]
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(config))
    refused(ckpt_copy, tmp_path / "out", ["architecture mismatch", str(ckpt_copy / "step2" / NON_EXPERT_FILE),
                                          "BertForTokenClassification", "bert.pooler"], config_dir=str(config_dir))


def test_another_hidden_size_is_an_architecture_mismatch(ckpt_copy, tmp_path):
    config_dir = tmp_path / "wider"
    config = json.loads((ckpt_copy / "step2" / "hf_model" / "config.json").read_text())
    config["intermediate_size"] = 64
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(config))
    refused(ckpt_copy, tmp_path / "out", ["architecture mismatch", "_model_states.pt", "(48, 32)", "(64, 32)"],
            config_dir=str(config_dir))


def test_another_model_type_is_an_architecture_mismatch(ckpt_copy, tmp_path):
    from transformers import RobertaConfig
    config_dir = tmp_path / "roberta"
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=48, architectures=["RobertaForSequenceClassification"])
    config.omoe_moe = json.loads((ckpt_copy / "step2" / "hf_model" / "config.json").read_text())["omoe_moe"]
    config.save_pretrained(config_dir)
    refused(ckpt_copy, tmp_path / "out", ["architecture mismatch", str(ckpt_copy / "step2" / NON_EXPERT_FILE),
                                          "RobertaForSequenceClassification"], config_dir=str(config_dir))


def test_other_moe_layers_are_an_architecture_mismatch(ckpt_copy, tmp_path):
    config_dir = tmp_path / "layer1"
    config = json.loads((ckpt_copy / "step2" / "hf_model" / "config.json").read_text())
    config["omoe_moe"]["layers"] = [1]
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(config))
    refused(ckpt_copy, tmp_path / "out", ["architecture mismatch", str(ckpt_copy / "step2" / NON_EXPERT_FILE),
                                          "records 2 MoE layers", "layers [1]"], config_dir=str(config_dir))


def test_missing_model_config_asks_for_config(ckpt_copy, tmp_path):
    shutil.rmtree(ckpt_copy / "step2" / "hf_model")
    refused(ckpt_copy, tmp_path / "out", [str(ckpt_copy / "step2" / "hf_model" / "config.json"), "--config"])


def test_missing_non_expert_file_is_named(ckpt_copy, tmp_path):
    (ckpt_copy / "step2" / NON_EXPERT_FILE).unlink()
    refused(ckpt_copy, tmp_path / "out", [str(ckpt_copy / "step2" / NON_EXPERT_FILE), "is missing"])


@pytest.mark.parametrize("name", [NON_EXPERT_FILE, "layer_0_expert_3_mp_rank_00_model_states.pt"])
def test_corrupt_file_is_named(ckpt_copy, tmp_path, name):
    path = ckpt_copy / "step2" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(ckpt_copy, tmp_path / "out", [str(path), "cannot be read", "corrupt"])


def test_file_changed_after_a_complete_save_is_named(ckpt_copy, tmp_path):
    tag = ckpt_copy / "step2"
    sizes = {os.path.relpath(os.path.join(r, n), tag): os.path.getsize(os.path.join(r, n))
             for r, _, names in os.walk(tag) for n in names}
    (tag / COMPLETE_MARKER).write_text(json.dumps({"format": 1, "tag": "step2", "global_steps": 3, "files": sizes}))
    path = tag / "layer_1_expert_0_mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:-10])
    refused(ckpt_copy, tmp_path / "out", [str(path), f"{sizes[path.name] - 10} bytes", str(sizes[path.name]),
                                          COMPLETE_MARKER])


def test_checkpoint_of_omoe_save_checkpoint_exports_without_warnings(local_ckpt, tmp_path):
    from omoe_ds.checkpoint.state import save_checkpoint
    engine = local_ckpt["engine"]
    save_checkpoint(engine, str(tmp_path / "ckpt"), model_config=engine.module.config, tokenizer=local_ckpt["tokenizer"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["omoe_export"]["complete_marker"] is True
    got = eval_outputs(load_exported(out), local_ckpt["tokenizer"])
    for key in ("logits", "hidden"):
        assert (got[key] - local_ckpt["outputs"][key]).abs().max().item() <= TOL


def test_non_empty_out_is_refused_and_kept(local_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"is not empty.*--overwrite"):
        export_checkpoint(str(local_ckpt["tag_dir"]), str(out))
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    export_checkpoint(str(local_ckpt["tag_dir"]), str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and is_export(str(out))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old directory left beside it


def test_out_inside_the_checkpoint_is_refused(ckpt_copy):
    refused(ckpt_copy, ckpt_copy / "step2" / "export", ["overlaps the checkpoint"])


def test_a_crash_while_writing_leaves_no_export(local_ckpt, tmp_path, monkeypatch):
    import omoe_ds.checkpoint.export as export

    def crash(state, directory):
        (open(os.path.join(directory, "model.safetensors"), "wb")).write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_tensors", crash)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(str(local_ckpt["tag_dir"]), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_tag_choice_prefers_complete_tags(ckpt_copy):
    for tag in ("a", "b"):
        shutil.copytree(ckpt_copy / "step2", ckpt_copy / tag)
    (ckpt_copy / "a" / COMPLETE_MARKER).write_text("")
    (ckpt_copy / "latest").write_text("b")   # b: no marker (an interrupted save)
    with pytest.warns(UserWarning, match=r"names tag 'b'.*newest complete tag 'a'"):
        assert resolve_tag_dir(str(ckpt_copy)) == (str(ckpt_copy / "a"), "a")
    (ckpt_copy / "b" / COMPLETE_MARKER).write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_tag_dir(str(ckpt_copy)) == (str(ckpt_copy / "b"), "b")
        assert resolve_tag_dir(str(ckpt_copy), tag="a") == (str(ckpt_copy / "a"), "a")
    with pytest.raises(CheckpointError, match=r"--tag nope.*tags in"):
        resolve_tag_dir(str(ckpt_copy), tag="nope")


def test_loader_refuses_another_head_and_a_bad_ep_size(local_ckpt, tmp_path):
    out = export_checkpoint(str(local_ckpt["tag_dir"]), str(tmp_path / "export"))
    with pytest.raises(CheckpointError, match=r"config\.json holds a BertForSequenceClassification.*"
                                              r"BertForTokenClassification"):
        load_exported(out, head="token_classification")
    assert load_exported(out, head="sequence_classification", bind_groups=False) is not None
    with pytest.raises(CheckpointError, match=r"ep_size=3 does not divide the 4 experts"):
        load_exported(out, ep_size=3)
    with pytest.raises(CheckpointError, match=r"ep_size=2 does not divide the world size 1"):
        load_exported(out, ep_size=2)
    with pytest.raises(CheckpointError, match=r"not an omoe-ds export"):
        load_exported(local_ckpt["tiny_bert"])


# ------------------------------------------------------------------------------------------------
# 2 ranks at EP=2 → export → EP=1 here and EP=2 on 2 ranks


def launch(suite, out, *extra):
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_local_port()), os.path.join(HERE, "export_worker.py"), "--suite", suite, "--out", str(out), *extra]
    proc = launching.run(cmd, env=CHILD_ENV, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"


def cli(*args):
    return launching.run([sys.executable, "-m", "omoe_ds.export", *args], env=CHILD_ENV, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def ep2_run(tiny_bert, tiny_data, tmp_path_factory):
    """One 2-rank launch: train at EP=2 and save to out/ckpt, export to out/export, load that at EP=2 (outputs,
    experts) and train it further; run omoe_ds.train on minilm-l6 (out/job), export it with the CLI's main
    (out/job_export) and train that further (out/job_again). Then the CLI exports out/ckpt again, to
    out/cli_export."""
    out = tmp_path_factory.mktemp("ep2")
    ds = json.loads(open(os.path.join(ROOT, "ds_configs", "finetune_zero2.json")).read())
    ds["train_micro_batch_size_per_gpu"] = 4
    (out / "ds.json").write_text(json.dumps(ds))
    launch("all", out, "--model", tiny_bert, "--data", tiny_data, "--ds-config", str(out / "ds.json"))
    before = snapshot(out / "ckpt")
    proc = cli("--ckpt", str(out / "ckpt"), "--out", str(out / "cli_export"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exported" in proc.stdout and "step 4" in proc.stdout and snapshot(out / "ckpt") == before
    return out


@pytest.mark.distributed
def test_cli_export_is_the_library_export_and_refuses_a_non_empty_out(ep2_run, capsys):
    from omoe_ds.checkpoint.export import main
    cli_export, export = ep2_run / "cli_export", ep2_run / "export"
    assert (cli_export / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    assert json.loads((cli_export / "config.json").read_text()) == json.loads((export / "config.json").read_text())
    assert sorted(os.listdir(cli_export)) == sorted(os.listdir(export))
    before = snapshot(cli_export)
    assert main(["--ckpt", str(ep2_run / "ckpt"), "--out", str(cli_export)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and str(cli_export) in err
    assert snapshot(cli_export) == before


@pytest.mark.distributed
def test_export_of_ep2_run_loads_in_one_process_with_the_engines_outputs(ep2_run, single_process_group):
    export = ep2_run / "cli_export"
    config = json.loads((export / "config.json").read_text())
    assert config["omoe_moe"]["ep_size"] == 1 and config["omoe_export"]["source_ep_size"] == 2
    assert config["omoe_export"]["global_steps"] == 4 and config["omoe_export"]["source_tag"] == TAG
    model = load_exported(str(export), ep_size=1)
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    got = eval_outputs(model, tokenizer)
    engine = torch.load(ep2_run / "engine_logits.pt")
    for key in ("logits", "hidden"):
        assert (got[key] - engine[key]).abs().max().item() <= TOL, key
    # the comparison sees expert placement: two experts swapped move the outputs far more than TOL
    experts = model.bert.encoder.layer[1].intermediate.dense.moe.deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():
        w = experts[0][0].weight.clone()
        experts[0][0].weight.copy_(experts[1][0].weight)
        experts[1][0].weight.copy_(w)
    swapped = eval_outputs(model, tokenizer)
    assert (swapped["hidden"] - engine["hidden"]).abs().max().item() > 1e3 * TOL


@pytest.mark.distributed
def test_export_loads_at_ep2_on_two_ranks_and_trains_further(ep2_run):
    engine, ep2 = torch.load(ep2_run / "engine_logits.pt"), torch.load(ep2_run / "ep2_logits.pt")
    for key in ("logits", "hidden"):
        assert (ep2[key] - engine[key]).abs().max().item() <= TOL, key
    assert (ep2_run / "further_training.ok").read_text() == "1"
    # each rank read only its own experts, under their global ids, bit for bit
    tag = ep2_run / "ckpt" / TAG
    for rank, ids in ((0, (0, 1)), (1, (2, 3))):
        local = torch.load(ep2_run / f"ep2_experts.rank{rank}.pt")
        assert {int(k.split(".")[1][len("expert"):]) for k in local} == set(ids)
        for key, tensor in local.items():
            layer, expert, w, pname = key.split(".")  # layer{L}.expert{g}.w{1|2}.{weight|bias}
            stored = torch.load(tag / f"{layer.replace('layer', 'layer_')}_{expert.replace('expert', 'expert_')}"
                                      "_mp_rank_00_model_states.pt", weights_only=True)
            (match,) = [v for k, v in stored.items() if k.endswith(f".{0 if w == 'w1' else 2}.{pname}")]
            assert torch.equal(tensor.view(torch.int32), match.view(torch.int32))


@pytest.mark.distributed
def test_every_exported_tensor_is_the_checkpoint_file_tensor_bit_for_bit(ep2_run):
    tag = ep2_run / "ckpt" / TAG
    with safe_open(str(ep2_run / "cli_export" / "model.safetensors"), framework="pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    expected = dict(torch.load(tag / NON_EXPERT_FILE, weights_only=True)["module"])
    files = sorted(p for p in os.listdir(tag) if p.startswith("layer_"))
    assert len(files) == 8  # 2 MoE layers x 4 experts
    for name in files:
        expected.update(torch.load(tag / name, weights_only=True))
    assert exported.keys() == expected.keys()
    for key, tensor in expected.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key].view(torch.uint8),
                                                                   tensor.contiguous().view(torch.uint8)), key
    # read_checkpoint's consolidation is what was written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = read_checkpoint(str(ep2_run / "ckpt"))
    assert source.state_dict.keys() == exported.keys()


@pytest.mark.distributed
def test_the_default_jobs_minilm_checkpoint_exports_loads_and_trains_further(ep2_run, single_process_group):
    """The real MiniLM's config.json names BertModel; the job trained a BertForSequenceClassification and must say
    so in its checkpoint, so that export, load_exported and --model <export dir> work on the default model."""
    from export_worker import JOB_STEPS
    status = (ep2_run / "job_export.status").read_text()
    assert status.startswith("exit 0\n"), f"python -m omoe_ds.export of the job's checkpoint failed: {status}"
    tag = ep2_run / "job" / "checkpoints" / f"global_step{JOB_STEPS}"
    for config_path in (tag / "hf_model" / "config.json", ep2_run / "job_export" / "config.json"):
        config = json.loads(config_path.read_text())
        assert config["architectures"] == ["BertForSequenceClassification"], config_path
        assert config["omoe_job"]["head"] == "sequence_classification" and config["hidden_size"] == 384
    engine = torch.load(ep2_run / "job_engine_outputs.pt", weights_only=False)  # the job's last eval: test split
    assert engine["step"] == JOB_STEPS
    model = load_exported(str(ep2_run / "job_export"), head="sequence_classification")
    with torch.no_grad():
        got = model(**{k: v for k, v in engine["inputs"].items() if k != "labels"}).logits
    # the same fp32 weights at EP=2 in batches of 8 per rank and at EP=1 in one batch: rounding only
    assert (got - engine["logits"]).abs().max().item() <= TOL
    again = json.loads((ep2_run / "job_again" / "results.json").read_text())
    assert again["steps"] == 3 and again["o_steps"] == 1 and again["model"] == str(ep2_run / "job_export")
    again_config = ep2_run / "job_again" / "checkpoints" / "global_step3" / "hf_model" / "config.json"
    assert json.loads(again_config.read_text())["architectures"] == ["BertForSequenceClassification"]


def test_an_older_jobs_checkpoint_naming_the_pretrained_base_class_exports_as_the_head_trained(ckpt_copy, tmp_path):
    """Checkpoints written before the job recorded its head carry the pretrained config's architectures (MiniLM:
    BertModel) over a classifier's tensors: export says so and exports the head the tensors are; an explicit
    --config naming the base class is still refused."""
    path = ckpt_copy / "step2" / "hf_model" / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = ["BertModel"]
    path.write_text(json.dumps(config))
    before = snapshot(ckpt_copy)
    with pytest.warns(UserWarning, match=r"names architectures \['BertModel'\].*exporting it as "
                                         r"BertForSequenceClassification"):
        out = export_checkpoint(str(ckpt_copy), str(tmp_path / "export"))
    assert snapshot(ckpt_copy) == before
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architectures"] == \
        ["BertForSequenceClassification"]
    assert load_exported(out, head="sequence_classification", bind_groups=False) is not None
    refused(ckpt_copy, tmp_path / "out", ["architecture mismatch", "BertModel", "bert.embeddings"],
            config_dir=str(ckpt_copy / "step2" / "hf_model"))


# ZeRO-3 through AutoEP, a decoder upcycled in some layers only: the same launch (export_worker's decoder_zero3)

FP32_EPS = 2.0 ** -23


def z3_expected(name: str) -> list:
    """The engine's parameters that make the exported tensor `name`: AutoEP's w1/w3/w2 [E, …] and router.gate
    become the transformers block's gate_up_proj = [w1 | w3], down_proj = w2 and gate; the tied head is the
    embedding; the Qwen2-MoE shared expert has none (it is zero)."""
    block, _, rest = name.partition(".mlp.")
    parts = {"experts.gate_up_proj": ["experts.w1", "experts.w3"], "experts.down_proj": ["experts.w2"],
             "gate.weight": ["router.gate.weight"]}
    if rest in parts:
        return [f"{block}.mlp.{part}" for part in parts[rest]]
    if rest.startswith("shared_expert"):
        return []
    return ["model.embed_tokens.weight" if name == "lm_head.weight" else name]


@pytest.mark.distributed
def test_zero3_autoep_checkpoint_exports_the_engines_gathered_parameters_element_for_element(ep2_run):
    import transformers
    from deepspeed.checkpoint import ds_to_universal
    from omoe_ds.checkpoint.zero3 import read_zero3
    engine = torch.load(ep2_run / "z3_engine.pt")
    assert engine["o_steps"] == 1
    # save_pretrained writes experts one by one, from_pretrained fuses them back bit for bit (test_export_fused.py)
    state = transformers.AutoModelForCausalLM.from_pretrained(str(ep2_run / "z3_export")).state_dict()
    used = set()
    for name, tensor in state.items():
        sources = z3_expected(name)
        if not sources:
            assert not tensor.any(), name
            continue
        expected = torch.cat([engine["params"][s] for s in sources], dim=1 if len(sources) > 1 else 0)
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
        used.update(sources)
    assert used == set(engine["params"])  # every engine parameter, gathered, element for element
    # DeepSpeed's own expert-aware converter (ds_to_universal, which needs Adam's moments) gathers the same fp32 tensors
    tag = ep2_run / "z3_ckpt" / "step3"
    universal = ep2_run / "z3_universal" / "step3"
    ds_to_universal.main(argparse.Namespace(input_folder=str(tag), output_folder=str(universal), num_extract_workers=1,
                                            num_merge_workers=1, keep_temp_folder=False, strict=True,
                                            inject_missing_state=False))
    _, params, experts = read_zero3(str(tag))
    assert sorted(experts) == sorted(n for n in engine["params"] if ".experts.w" in n)
    for name, tensor in params.items():
        if name == "lm_head.weight":  # tied: DeepSpeed keeps the embedding only
            continue
        stored = torch.load(universal / "zero" / name / "fp32.pt", weights_only=False)
        stored = stored["param"] if isinstance(stored, dict) else stored
        assert torch.equal(stored.reshape(tensor.shape), tensor), name


@pytest.mark.distributed
def test_partially_upcycled_decoder_exports_as_qwen2_moe_with_the_engines_logits(ep2_run):
    """Layers 1 and 3 stayed dense: Qwen2-MoE holds them as mlp_only_layers. Plain from_pretrained loads it and its
    logits equal the trained engine's within fp32 reduction-order rounding."""
    import transformers
    from export_worker import Z3_EVAL, z3_batch
    export = ep2_run / "z3_export"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(export), output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and not any(info.values()), info
    config = model.config
    assert config.mlp_only_layers == [1, 3] and config.norm_topk_prob and not config.qkv_bias
    assert config.num_experts == 4 and config.num_experts_per_tok == 2 and config.tie_word_embeddings
    meta = config.omoe_export
    assert meta["trained_architecture"] == "MixtralForCausalLM" and meta["source_zero_stage3"] is True
    assert meta["num_experts_per_layer"] == [4, 4] and meta["global_steps"] == 3
    engine = torch.load(ep2_run / "z3_engine.pt")
    with torch.no_grad():
        logits = model.eval()(**z3_batch(Z3_EVAL)).logits
    # Same weights, same operations; AutoEP combines the top-k expert outputs and sums its GEMMs in another order.
    # A reordered fp32 sum differs by a few ulp of its magnitude: 4 ulp per decoder layer and the head, at the
    # logits' scale. Two experts swapped, or a dense layer routed, move logits by ≫ 1e-3.
    bound = 4 * (config.num_hidden_layers + 1) * FP32_EPS * max(engine["logits"].abs().max().item(), 1.0)
    assert (logits - engine["logits"]).abs().max().item() <= bound
    assert load_exported(str(export)).config.mlp_only_layers == [1, 3]


@pytest.mark.distributed
def test_the_qwen2_moe_export_trains_further_through_autoep_at_zero3(ep2_run):
    """from_pretrained of the export, AutoEP's qwen3_moe preset (which covers Qwen2-MoE), ZeRO-3, OMoE: it trains,
    O step included, and the zero shared expert stays exactly zero (every gradient of it has a zero factor)."""
    further = json.loads((ep2_run / "z3_further.json").read_text())
    assert further["class"] == "Qwen2MoeForCausalLM" and further["steps"] == 3 and further["o_steps"] == 1
    assert further["omoe_layers"] == 2
    assert len(further["shared_expert_max_abs"]) == 8 and not any(further["shared_expert_max_abs"].values())


@pytest.mark.distributed
@pytest.mark.parametrize("removed, match", [
    ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
    ("zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt is missing"),
    ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt is missing"),
])
def test_incomplete_zero3_checkpoint_is_refused_naming_the_file(ep2_run, tmp_path, removed, match):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ep2_run / "z3_ckpt", ckpt)
    os.remove(ckpt / "step3" / removed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the completion marker lists the removed file
        refused(ckpt, tmp_path / "out", [match, "export another tag"])
