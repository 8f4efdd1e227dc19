"""Merging dropped visual tokens into kept ones: partners, sizes and the size-weighted mean."""

from __future__ import annotations

import torch

from edge_prune.merging import merge_into_kept


def test_each_dropped_token_joins_its_most_similar_kept_token():
    # one request, 4 visual tokens and a text token; tokens 0 and 2 are kept
    hidden = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 2.0], [5.0, 5.0]]])
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0]])  # token 1 already stands for two tokens
    visual = torch.tensor([[True, True, True, True, False]])
    keep = torch.tensor([[True, False, True, False, False]])
    merged, new_size = merge_into_kept(hidden, size, visual, keep)
    # token 1 (size 2) joins token 0, token 3 joins token 2: the kept tokens stand for all five
    assert new_size[0, [0, 2]].tolist() == [3.0, 2.0]
    assert torch.allclose(merged[0, 0], (hidden[0, 0] + 2 * hidden[0, 1]) / 3)
    assert torch.allclose(merged[0, 2], (hidden[0, 2] + hidden[0, 3]) / 2)
    assert torch.equal(merged[0, 4], hidden[0, 4])  # text is never touched
    assert torch.equal(hidden[0, 0], torch.tensor([1.0, 0.0]))  # the input is not modified


def test_a_request_that_keeps_nothing_is_left_alone():
    hidden = torch.randn(2, 3, 4)
    size = torch.ones(2, 3)
    visual = torch.ones(2, 3, dtype=torch.bool)
    keep = torch.tensor([[False, False, False], [True, False, False]])
    merged, new_size = merge_into_kept(hidden, size, visual, keep)
    assert torch.equal(merged[0], hidden[0]) and new_size[0].tolist() == [1.0, 1.0, 1.0]
    assert new_size[1, 0] == 3.0
