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


def build(stage, accumulation=1):
    torch.manual_seed(0)
    model = SmallMoEClassifier(SPEC, ep_size=1)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accumulation,
              "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "omoe": {"enabled": True, "skip_step": 2}}
    engine, *returned = omoe_ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                           config=config)
    return engine, model, returned


def projection_hooks_on(linear) -> bool:
    return "forward" in linear.__dict__ or bool(linear.weight._backward_hooks)


@pytest.mark.parametrize("stage", [0, 2])
def test_destroyed_omoe_engine_is_collected(engine_env, stage):
    """Destroyed inside an O step (after its backward, before its update): the projection's hooks go too."""
    engine, model, returned = build(stage)
    x, y = make_task(SPEC, 20, seed=0)
    for step in range(5):
        engine.backward(engine(x[4 * step:4 * step + 4], y[4 * step:4 * step + 4]))
        if step < 4:
            engine.step()
    assert engine.omoe.o_steps_done == 1 and engine.omoe.phase == "O"
    expert = engine.omoe.layers[0].linears[0][0]
    assert projection_hooks_on(expert)
    refs = [weakref.ref(obj) for obj in (engine, model, engine.omoe)]
    engine.destroy()
    assert not projection_hooks_on(expert)
    del engine, model, expert, returned
    gc.collect()
    assert [ref() is None for ref in refs] == [True] * 3


def test_projection_hooks_exist_in_o_steps_only(engine_env):
    """R steps run with the recorder's hooks alone: the projection's are attached at an O step's forward and
    removed after its update, with gradient accumulation too (attached once for the step's micro-batches)."""
    engine, model, _ = build(2, accumulation=2)
    omoe = engine.omoe
    experts = [linear for layer in omoe.layers for per_expert in layer.linears for linear in per_expert]
    x, y = make_task(SPEC, 40, seed=0)
    seen = []  # (step, micro-batch, phase, the forward's hooks, after engine.step())
    for step in range(5):
        for micro in range(2):
            batch = slice(8 * step + 4 * micro, 8 * step + 4 * micro + 4)
            loss = engine(x[batch], y[batch])
            during = [projection_hooks_on(e) for e in experts]
            engine.backward(loss)
            engine.step()
            seen.append((step, micro, omoe.phase, during, [projection_hooks_on(e) for e in experts]))
    assert [phase for *_, phase, _, _ in seen] == ["R"] * 4 + ["O"] * 2 + ["R"] * 2 + ["O"] * 2
    for step, micro, phase, during, after in seen:
        assert during == [phase == "O"] * len(experts), (step, micro)
        assert after == [phase == "O" and micro == 0] * len(experts), (step, micro)  # removed after the update
    assert omoe.o_steps_done == 2 and not omoe._projection_hooks
