"""omoe_ds.export of a transformers fused-expert MoE model (Mixtral, OLMoE): a one-process engine trains a tiny
seeded model through an O step, omoe_ds.save_checkpoint writes it with its config and tokenizer, and the export is
a plain save_pretrained directory that both load_exported and transformers' from_pretrained load with the engine's
tensors bit for bit; a config with another expert count, and an EP size other than 1, are refused.
"""
import json
import os
import shutil
import warnings

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

import omoe_ds
from omoe_ds.checkpoint.export import export_checkpoint, is_export, load_exported, main
from omoe_ds.checkpoint.layout import NON_EXPERT_FILE, CheckpointError
from test_export import one_process_engine, refused, snapshot

VOCAB = 48
_COMMON = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=32, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {  # OLMoE ties its embeddings: the export must keep them one tensor
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                                  tie_word_embeddings=False, **_COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=12, num_experts=4, num_experts_per_tok=2,
                                              tie_word_embeddings=True, **_COMMON),
}
EXPERT_COUNT_FIELD = {"mixtral": "num_local_experts", "olmoe": "num_experts"}
ENGINE_CONFIG = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}, "omoe": {"skip_step": 2, "alpha0": 0.1}, "steps_per_print": 10 ** 9}


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tiny_tokenizer():
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                                eos_token="[EOS]")


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def fused_run(request, tmp_path_factory, single_process_group):
    """A save_dir with tag "t" after 3 steps (an O step at 2), the engine's state and logits on a held-out batch."""
    case = request.param
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[case]())
    engine = one_process_engine(model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), ENGINE_CONFIG)
    initial = {k: v.clone() for k, v in engine.module.state_dict().items()}
    for step in range(3):
        engine.backward(engine(**batch(step)).loss)
        engine.step()
    assert engine.omoe.o_steps_done == 1
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    assert any(not torch.equal(state[k], initial[k]) for k in state if k.endswith("experts.down_proj"))
    save_dir = tmp_path_factory.mktemp(f"fused_{case}") / "ckpt"
    omoe_ds.save_checkpoint(engine, str(save_dir), tag="t", model_config=model.config, tokenizer=tiny_tokenizer())
    engine.module.eval()
    return {"case": case, "save_dir": save_dir, "state": state, "logits": logits(engine.module, batch(10)),
            "class": type(model).__name__}


@pytest.fixture(scope="module")
def exported(fused_run, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"export_{fused_run['case']}") / "export"
    before = snapshot(fused_run["save_dir"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete omoe_ds checkpoint exports without warnings
        export_checkpoint(str(fused_run["save_dir"]), str(out))
    assert snapshot(fused_run["save_dir"]) == before
    return out


def assert_engine_state(model, fused_run):
    got = model.state_dict()
    assert set(got) == set(fused_run["state"])
    for key, expected in fused_run["state"].items():
        assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key
    assert torch.equal(logits(model, batch(10)), fused_run["logits"])


def test_export_is_a_save_pretrained_directory_with_the_moe_layout(fused_run, exported):
    assert is_export(str(exported))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(exported))
    assert not [n for n in os.listdir(exported.parent) if ".tmp-" in n]
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [fused_run["class"]] and "omoe_moe" not in config
    meta = config["omoe_export"]
    assert meta["layout"] == "hf-fused" and meta["source_tag"] == "t" and meta["global_steps"] == 3
    assert meta["num_moe_layers"] == 2 and meta["num_experts_per_layer"] == [4, 4] and meta["top_k"] == 2
    assert meta["complete_marker"] is True and meta["dtypes"] == ["float32"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert tokenizer("w3 w7 w40")["input_ids"] == [3, 7, 40]


def test_load_exported_is_the_engines_model_bit_for_bit(fused_run, exported):
    assert_engine_state(load_exported(str(exported)), fused_run)


def test_plain_from_pretrained_is_the_engines_model_bit_for_bit(fused_run, exported):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    assert type(model).__name__ == fused_run["class"] and not any(info.values()), info
    assert_engine_state(model.eval(), fused_run)


def test_load_exported_refuses_another_ep_size_and_head(exported):
    with pytest.raises(CheckpointError, match=r"ep_size=2: .*fused experts.*replicated on every rank.*ep_size=1"):
        load_exported(str(exported), ep_size=2)
    with pytest.raises(CheckpointError, match=r"architecture mismatch: .*config\.json holds a .*ForCausalLM.*"
                                              r"head='base' asks for .*Model;"):
        load_exported(str(exported), head="base")
    assert load_exported(str(exported), head="causal_lm") is not None


def test_config_with_another_expert_count_is_refused(fused_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(fused_run["save_dir"], ckpt)
    path = ckpt / "t" / "hf_model" / "config.json"
    field = EXPERT_COUNT_FIELD[fused_run["case"]]
    text = path.read_text()
    assert f'"{field}": 4,' in text
    path.write_text(text.replace(f'"{field}": 4,', f'"{field}": 8,'))  # same size: the marker's sizes still hold
    refused(ckpt, tmp_path / "out", ["expert count mismatch", str(ckpt / "t" / NON_EXPERT_FILE), "holds 4 experts",
                                     f"{field}=8", str(path), "--config"])


def test_config_with_other_layers_is_an_architecture_mismatch(fused_run, tmp_path):
    config = json.loads((fused_run["save_dir"] / "t" / "hf_model" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "deeper").mkdir()
    (tmp_path / "deeper" / "config.json").write_text(json.dumps(config))
    refused(fused_run["save_dir"], tmp_path / "out", ["architecture mismatch", NON_EXPERT_FILE, "absent",
                                                      "model.layers.2.", str(tmp_path / "deeper" / "config.json")],
            config_dir=str(tmp_path / "deeper"))


def test_missing_config_names_the_trained_model_and_config_dir_supplies_it(fused_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(fused_run["save_dir"], ckpt)
    shutil.move(ckpt / "t" / "hf_model", tmp_path / "config")
    refused(ckpt, tmp_path / "out", [str(ckpt / "t" / "hf_model" / "config.json"), "is missing", "--config",
                                     fused_run["class"], "fused experts"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the completion marker lists the moved files
        export_checkpoint(str(ckpt), str(tmp_path / "out"), config_dir=str(tmp_path / "config"))
    assert_engine_state(load_exported(str(tmp_path / "out")), fused_run)


def test_cli_reports_the_fused_layout(fused_run, tmp_path, capsys):
    assert main(["--ckpt", str(fused_run["save_dir"]), "--out", str(tmp_path / "cli")]) == 0
    assert "2 MoE layers x 4 experts, top-2 (transformers' fused experts)" in capsys.readouterr().out
