"""The offline decoder: SmolLM2-135M from its GGUF (dequantised once into the cache), upcycled to Mixtral with
the dense function kept; the routing watchers on a layout that routes padding; the job's decoder refusals.

The real model is loaded once per session (the `smollm2` fixture); the cache is $OMOE_DS_CACHE or
~/.cache/omoe_ds, so a second session reads the safetensors copy instead of dequantising again."""
import os

import pytest
import torch
import transformers

from omoe_ds import OMoEConfigError
from omoe_ds.experts import find_expert_layers
from omoe_ds.finetune import models
from omoe_ds.finetune.train import main
from omoe_ds.finetune.upcycle import UpcycleConfig, upcycle_to_mixtral
from omoe_ds.studies.diversity import ExpertLoadCounter, LayerInputSample
from tiny_job import write_instructions

pytestmark = pytest.mark.decoder
# The upcycled model runs gate and up as one fused product and sums the top-k copies (weights renormalised to
# 1): fp32 reassociation per layer, measured 1.5e-6 of the logit scale over 30 layers. The bound:
REL_TOL = 1e-5
TEXTS = ["The capital of France is", "Mixture-of-experts models send each token to a few experts, not all."]


@pytest.fixture(scope="session")
def smollm2():
    """(dir, dense LlamaForCausalLM in eval mode, tokenizer, padded batch of TEXTS)."""
    path = models.smollm2_135m_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return path, model, tokenizer, tokenizer(TEXTS, return_tensors="pt", padding=True)


def test_smollm2_is_dequantised_once_and_is_the_gguf_model(smollm2, monkeypatch):
    path, model, tokenizer, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # the copy is read back, never dequantised again
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the cached copy was dequantised again"))
    assert models.smollm2_135m_path() == path
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1]:]).strip().startswith("Paris")


@pytest.mark.parametrize("top_k,layers", [(1, None), (2, None), (1, (0, 29))], ids=["top1", "top2", "top1_layers0_29"])
def test_upcycled_smollm2_computes_the_dense_model(smollm2, top_k, layers):
    _, dense, _, batch = smollm2
    moe = upcycle_to_mixtral(dense, UpcycleConfig(num_experts=4, top_k=top_k, layers=layers)).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    moe_layers = [i for i, layer in enumerate(moe.model.layers) if type(layer.mlp).__name__ == "MixtralSparseMoeBlock"]
    assert moe_layers == (list(layers) if layers else list(range(30)))
    assert moe.config.omoe_upcycle["layers"] == moe_layers
    with torch.no_grad():
        want, got = dense(**batch).logits, moe(**batch).logits
    real = batch["attention_mask"].bool()
    scale = want[real].abs().max()
    assert (got - want)[real].abs().max() <= REL_TOL * scale
    # the experts are copies; the router is seeded, small and not tied
    experts = moe.model.layers[moe_layers[0]].mlp.experts
    assert torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[3])
    router = moe.model.layers[moe_layers[0]].mlp.gate.weight
    assert 0.018 < router.std().item() < 0.022 and not torch.equal(router[0], router[1])


def test_router_init_is_seeded(smollm2):
    _, dense, _, _ = smollm2
    a, b, c = (upcycle_to_mixtral(dense, UpcycleConfig(layers=(3,), seed=s)).model.layers[3].mlp.gate.weight
               for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def tiny_llama(**overrides):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, **overrides)
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(config)


@pytest.mark.parametrize("model,upcycle,match", [
    (lambda: tiny_llama(attention_bias=True), UpcycleConfig(), r"attention_bias=True: Mixtral's attention"),
    (lambda: tiny_llama(), UpcycleConfig(layers=(2,)), r"has 2 decoder layers \(0..1\)"),
    (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                                    intermediate_size=32, num_attention_heads=2,
                                                                    num_key_value_heads=1)),
     UpcycleConfig(), r"model_type 'qwen2' cannot be upcycled"),
])
def test_upcycle_refusals(model, upcycle, match):
    with pytest.raises(OMoEConfigError, match=match):
        upcycle_to_mixtral(model(), upcycle)


@pytest.mark.parametrize("kwargs,match", [({"num_experts": 1}, r"num_experts=1"), ({"top_k": 5}, r"top_k=5"),
                                          ({"layers": (1, 1)}, r"distinct"), ({"router_std": 0.0}, r"router_std=0.0")])
def test_upcycle_config_refusals(kwargs, match):
    with pytest.raises(OMoEConfigError, match=match):
        UpcycleConfig(**kwargs)


def test_upcycled_sequence_classifier_keeps_logits_and_counts_real_tokens_only():
    """A tiny llama classifier upcycled (head and all): same logits; the load counter and token sample of the
    fused layout (whose router routes padding) see the real tokens only, k routes each."""
    dense = tiny_llama(pad_token_id=0).eval()
    moe = upcycle_to_mixtral(dense, UpcycleConfig(num_experts=4, top_k=2)).eval()
    assert type(moe).__name__ == "MixtralForSequenceClassification"
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = (ids != 0).long()
    layers = find_expert_layers(moe)
    counter, sample = ExpertLoadCounter(layers, moe), LayerInputSample(layers, moe)
    counter.enabled = sample.enabled = True
    with torch.no_grad():
        want, got = dense(input_ids=ids, attention_mask=mask).logits, moe(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() <= REL_TOL * want.abs().max()
    assert [sum(layer["tokens"]) for layer in counter.read()] == [2 * 8, 2 * 8]
    assert [t.shape for t in sample.take()] == [torch.Size([8, 16])] * 2


@pytest.mark.parametrize("flags,match", [
    (["--model", "minilm-l6", "--expert-parallel", "autoep", "--ep-size", "2"],
     r"--expert-parallel autoep with --model minilm-l6 \(bert\).*drop --expert-parallel"),
    (["--model", "smollm2-135m", "--ep-size", "2"], r"--ep-size=2 with the decoder smollm2-135m.*--expert-parallel autoep"),
    (["--model", "smollm2-135m", "--moe-layers", "30"], r"has 30 decoder layers"),
    (["--model", "smollm2-135m", "--adapter", "omoe-lora", "--expert-parallel", "autoep"],
     r"--adapter omoe-lora with --expert-parallel"),
])
def test_decoder_job_refusals_before_any_compute(smollm2, tiny_data, tmp_path, flags, match):
    with pytest.raises(OMoEConfigError, match=match):
        main(["--task", "csv", "--data-dir", tiny_data, "--text-cols", "text", "--label-col", "label",
              "--output-dir", str(tmp_path / "out"), *flags])
    assert not os.path.exists(tmp_path / "out")


# ---- causal LM fine-tuning: the data, the targets, the perplexity

@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    return write_instructions(tmp_path_factory.mktemp("instructions"))


def test_instruction_data_trains_on_the_response_and_eos_only(smollm2, instructions):
    from omoe_ds.finetune.features import IGNORE_INDEX, encode_task
    from omoe_ds.finetune.tasks import load_task
    _, _, tokenizer, _ = smollm2
    spec, raw = load_task("json", instructions)
    assert spec.head == "causal_lm" and spec.primary_metric == "perplexity"
    encoded = encode_task(spec, raw, tokenizer, 32)
    row = encoded["train"][3]
    prompt = tokenizer(raw["train"][3]["prompt"]).input_ids
    response = tokenizer(" 4.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    n = len(prompt) + len(response)
    assert row["input_ids"][:n].tolist() == prompt + response
    assert row["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * (32 - n)
    assert row["attention_mask"].tolist() == [1] * n + [0] * (32 - n)
    with pytest.raises(OMoEConfigError, match=r"40 of the 40 train rows keep no response token within "
                                              r"--max-length=4.*raise --max-length"):
        encode_task(spec, raw, tokenizer, 4)


def test_lm_perplexity_is_the_models_own_loss(smollm2, instructions):
    """evaluate_lm on one batch: exp of the HF model's mean next-token loss over the same target tokens."""
    from omoe_ds.finetune.features import encode_task
    from omoe_ds.finetune.tasks import load_task
    from omoe_ds.finetune.train import evaluate_lm
    _, model, tokenizer, _ = smollm2
    spec, raw = load_task("json", instructions)
    dev = encode_task(spec, raw, tokenizer, 32)["dev"]

    class Engine:  # the module and the two mode switches evaluate_lm uses
        module = model
        def eval(self): model.eval()
        def train(self): model.eval()  # keep the shared fixture in eval mode
    got = evaluate_lm(Engine(), dev, batch_size=len(dev))
    batch = dev[:]
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert got["tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)  # fp32 sums of ~40 terms, one reduction order apart
    assert got["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)


@pytest.mark.parametrize("flags,match", [
    (["--model", "minilm-l6"], r"causal LM fine-tuning, and --model minilm-l6 \(bert\) is not a decoder"),
    (["--model", "smollm2-135m", "--head", "causal_lm", "--label-col", "response"], r"causal LM fine-tuning has no labels"),
])
def test_causal_lm_refusals(smollm2, instructions, tmp_path, flags, match):
    with pytest.raises(OMoEConfigError, match=match):
        main(["--task", "json", "--data-dir", instructions, "--output-dir", str(tmp_path / "out"), *flags])
    assert not os.path.exists(tmp_path / "out")
