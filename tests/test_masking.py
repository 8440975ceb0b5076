from fractions import Fraction

import pytest
import torch

from fastmavil.masking import gather_tokens, num_visible, random_masking


@pytest.mark.parametrize("num_tokens", [7, 64, 512, 1568])
@pytest.mark.parametrize("ratio", [0.75, 0.8, 0.85, 0.9])
def test_partition_restore_and_visible_count(num_tokens, ratio):
    ids = random_masking((2, 3), num_tokens, ratio)
    # round half up, computed exactly with fractions
    expected = int((1 - Fraction(str(ratio))) * num_tokens + Fraction(1, 2))
    expected = min(max(expected, 1), num_tokens - 1)
    assert ids.keep.shape == (2, 3, expected)
    assert ids.mask.shape == (2, 3, num_tokens - expected)
    both = torch.cat([ids.keep, ids.mask], dim=-1)
    assert torch.equal(both.sort(dim=-1).values, torch.arange(num_tokens).expand(2, 3, -1))
    tokens = torch.randn(6, num_tokens, 5)
    shuffled = gather_tokens(tokens, both.flatten(0, 1))
    assert torch.equal(gather_tokens(shuffled, ids.restore.flatten(0, 1)), tokens)


def test_visible_count_is_nearest_integer():
    assert num_visible(512, 0.8) == 102    # 102.4 (float error: 102.39999...)
    assert num_visible(1568, 0.8) == 314   # 313.6
    assert num_visible(10, 0.75) == 3      # 2.5 rounds half up
    assert num_visible(4, 0.99) == 1 and num_visible(4, 0.01) == 3  # both sides non-empty


def test_masks_differ_per_sample_and_view_and_follow_the_generator():
    ids = random_masking((2, 4), 64, 0.8)
    keeps = {tuple(k.sort().values.tolist()) for k in ids.keep.flatten(0, 1)}
    assert len(keeps) == 8
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(random_masking((3,), 64, 0.8, generator=g1).keep,
                       random_masking((3,), 64, 0.8, generator=g2).keep)


def test_gather_tokens_matches_indexing():
    x = torch.randn(3, 10, 4)
    ids = torch.randint(0, 10, (2, 3, 5))
    out = gather_tokens(x, ids)
    for v in range(2):
        for b in range(3):
            assert torch.equal(out[v, b], x[b, ids[v, b]])
    x.requires_grad_(True)  # each token's gradient sums its picks over every view
    grad = torch.randn(2, 3, 5, 4)
    gather_tokens(x, ids).backward(grad)
    expected = torch.zeros(3, 10, 4)
    for v in range(2):
        for b in range(3):
            expected[b].index_add_(0, ids[v, b], grad[v, b])
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(gather_tokens(x, ids[0]), out[0])  # without views
