"""Input capture relies on DeepSpeed filling each expert's capacity slots from slot 0 up (and padding
the rest with zero rows): the receiving rank tells its filled slots from the empty ones without any
count from the sender. Check the prefix layout on DeepSpeed's own gates, with token dropping, random
token selection and padding masks."""
import pytest
import torch
from deepspeed.moe.sharded_moe import top1gating, top2gating


def assert_prefix(indices, locations, num_experts):
    for e in range(num_experts):
        slots = locations[indices == e]
        assert torch.equal(slots.sort().values, torch.arange(len(slots), dtype=slots.dtype))


@pytest.mark.parametrize("drop_tokens,use_rts", [(False, False), (True, False), (True, True)])
def test_top1_slots_are_a_prefix(drop_tokens, use_rts):
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(64, 4)
        used = (torch.rand(64) > 0.3).long()
        out = top1gating(logits, 0.5, 1, used_token=used, drop_tokens=drop_tokens, use_rts=use_rts, sparse_routes=True)
        indices, locations = out[3], out[4]
        assert_prefix(indices, locations, 4)
        assert (indices[0][used == 0] == -1).all()  # padding is never routed


@pytest.mark.parametrize("drop_tokens", [False, True])
def test_top2_slots_are_a_prefix(drop_tokens):
    torch.manual_seed(1)
    for _ in range(20):
        out = top2gating(torch.randn(64, 4), 0.5, 1, drop_tokens=drop_tokens, top2_2nd_expert_sampling=True,
                         sparse_routes=True)
        assert_prefix(out[3], out[4], 4)
