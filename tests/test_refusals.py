"""What OMoE assumes but cannot run correctly is refused before the engine exists (or, for a recompute
nobody declared, at the first forward inside backward), with the bad value and the fix in the message."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import omoe_ds
from omoe_ds import OMoEConfigError
from omoe_ds.finetune.small_moe import SmallMoEClassifier, SmallMoESpec

SPEC = SmallMoESpec(d_in=4, d_model=8, d_ff=12, num_layers=1, num_experts=2, num_classes=3, seq_len=4)


def config(stage=0, **extra):
    return {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, **extra}


@pytest.fixture
def engine_env(single_process_group, monkeypatch):
    """A world-1 group and the LOCAL_RANK a launcher would set: deepspeed.initialize builds an engine."""
    monkeypatch.setenv("LOCAL_RANK", "0")


def small_model():
    torch.manual_seed(0)
    return SmallMoEClassifier(SPEC, ep_size=1)


def test_strided_expert_parallel_layout_is_refused():
    with pytest.raises(OMoEConfigError, match="use_data_before_expert_parallelism=true.*remove the key"):
        omoe_ds.initialize(model=small_model(), config=config(use_data_before_expert_parallelism=True))


def test_tensor_parallel_mpu_is_refused():
    class FakeMPU:
        pass
    with pytest.raises(OMoEConfigError, match="mpu=FakeMPU.*run without mpu"):
        omoe_ds.initialize(model=small_model(), config=config(), mpu=FakeMPU())


def test_gradient_checkpointing_over_moe_layers_is_refused(tiny_bert):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    omoe_ds.convert_to_moe(model, omoe_ds.MoEConversionConfig(num_experts=2))
    with pytest.raises(OMoEConfigError, match="gradient checkpointing is on.*gradient_checkpointing_disable"):
        omoe_ds.initialize(model=model, config=config())


@pytest.mark.parametrize("stage", [1, 2])
def test_adagrad_under_zero_is_refused_in_every_form(engine_env, stage):
    """An instance or the config's type is refused before the engine; a factory when DeepSpeed calls it."""
    def adagrad(params):
        return torch.optim.Adagrad(params, lr=1e-2)
    model = small_model()
    with pytest.raises(OMoEConfigError, match=f"stage={stage} with torch.optim.Adagrad.*use stage 0"):
        omoe_ds.initialize(model=model, optimizer=adagrad(model.parameters()), config=config(stage))
    with pytest.raises(OMoEConfigError, match=f"stage={stage} with the config optimizer \"Adagrad\""):
        omoe_ds.initialize(model=small_model(), config=config(stage, optimizer={"type": "Adagrad", "params": {"lr": 1e-2}}))
    with pytest.raises(OMoEConfigError, match=f"stage={stage} with torch.optim.Adagrad"):
        omoe_ds.initialize(model=small_model(), optimizer=adagrad, config=config(stage))


class CheckpointedMoE(SmallMoEClassifier):
    """Recomputes its MoE layers in backward through torch.utils.checkpoint, without any flag saying so."""

    def logits(self, x):
        h = self.embed(x)
        for norm, moe in zip(self.norms, self.moes):
            h = h + checkpoint(lambda t, moe=moe, norm=norm: moe(norm(t))[0], h, use_reentrant=False)
        return self.head(h.mean(dim=1))


def test_undeclared_recompute_of_an_moe_layer_fails_at_the_first_backward(engine_env):
    torch.manual_seed(0)
    model = CheckpointedMoE(SPEC, ep_size=1)
    engine, *_ = omoe_ds.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, SPEC.seq_len, SPEC.d_in, generator=g), torch.randint(SPEC.num_classes, (4,), generator=g)
    loss = engine(x, y)
    with pytest.raises(RuntimeError, match="ran its forward inside backward.*do not checkpoint MoE layers"):
        engine.backward(loss)
