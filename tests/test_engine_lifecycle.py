"""engine.destroy() releases an OMoE engine: the hooks and wrappers OMoE added are removed, so the engine, its
model and OMoE's state are collected (a parameter's tensor hooks are held from C++, out of the collector's sight)."""
import gc
import weakref

import pytest
import torch

import omoe_ds
from omoe_ds.finetune.small_moe import SmallMoEClassifier, SmallMoESpec, make_task

SPEC = SmallMoESpec(d_in=4, d_model=8, d_ff=12, num_layers=2, num_experts=2, num_classes=3, seq_len=4)


@pytest.fixture
def engine_env(single_process_group, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")


@pytest.mark.parametrize("stage", [0, 2])
def test_destroyed_omoe_engine_is_collected(engine_env, stage):
    torch.manual_seed(0)
    model = SmallMoEClassifier(SPEC, ep_size=1)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "omoe": {"enabled": True, "skip_step": 2}}
    engine, *returned = omoe_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                    config=config)
    x, y = make_task(SPEC, 20, seed=0)
    for step in range(5):
        engine.backward(engine(x[4 * step:4 * step + 4], y[4 * step:4 * step + 4]))
        engine.step()
    assert engine.omoe.o_steps_done == 2
    expert = engine.omoe.layers[0].linears[0][0]
    refs = [weakref.ref(obj) for obj in (engine, model, engine.omoe)]
    engine.destroy()
    assert "forward" not in expert.__dict__ and not expert.weight._backward_hooks
    del engine, model, expert, returned
    gc.collect()
    assert [ref() is None for ref in refs] == [True] * 3
