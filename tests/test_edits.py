"""The decode-step shortcuts give exactly what the general masked edit gives: an all-true edit
applied without its mask, and position rules answered in plain Python at width 1."""

from __future__ import annotations

import pytest
import torch

from lens_steer.interventions import (
    AtPositions,
    Edit,
    EveryPosition,
    NewestPosition,
    WhenNewestToken,
    apply_edit,
)
from lens_steer.sites import parse_site

OPS = [("add", "v", 1.0), ("add", "v", 2.5), ("zero", "0", 1.0), ("mean", "v", 1.0),
       ("scale", None, 0.3), ("scale", None, 1.0), ("project_out", "u", 1.0),
       ("project_out", "u", 0.7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head", [None, 2])
@pytest.mark.parametrize("op,value,scale", OPS)
def test_full_mask_edit_equals_the_masked_edit(dtype, head, op, value, scale):
    gen = torch.Generator().manual_seed(0)
    shape, vshape = ((5, 3, 4, 8), (8,)) if head is not None else ((5, 3, 32), (32,))
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype) * 3
    v = {"v": torch.randn(vshape, generator=gen), "0": torch.zeros(()),
         "u": torch.nn.functional.normalize(torch.randn(vshape, generator=gen), dim=0),
         None: None}[value]
    v = None if v is None else v.to(dtype)
    site = parse_site("blocks.0.attn.hook_z" if head is not None else "blocks.0.hook_resid_pre")
    edit = Edit(site, torch.ones(5, 3, dtype=torch.bool), op, v, scale, head, None, 0, True)
    masked, fast = apply_edit(x, *edit.args()), edit.apply(x)
    assert fast.dtype == masked.dtype and torch.equal(fast, masked)
    assert not torch.equal(fast, x) or (op == "scale" and scale == 1.0)


@pytest.mark.parametrize("rule", [EveryPosition(), NewestPosition(), AtPositions((0, 2, 3)),
                                  WhenNewestToken(lambda s: s[-1] % 2 == 1)], ids=str)
@pytest.mark.parametrize("n_new", [[1, 1, 1, 1], [1, 0, 1, 0]])
def test_rules_answer_decode_steps_like_their_masks(rule, n_new):
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1]]
    assert rule.newest(seqs, n_new) == rule.mask(seqs, n_new, 1).view(-1).tolist()
