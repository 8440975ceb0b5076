import pytest
import torch

from fastmavil.masking import random_masking
from fastmavil.models.patch import PatchEmbed, patchify, unpatchify


@pytest.mark.parametrize("shape, patch", [
    ((2, 1, 48, 32), (16, 16)),          # audio (B, 1, T, F)
    ((1, 1, 64, 128), (16, 16)),
    ((2, 3, 6, 48, 32), (2, 16, 16)),    # video (B, C, Fr, H, W), non-square
    ((1, 2, 3, 5, 7), (1, 5, 7)),        # odd sizes
])
def test_patchify_order_and_inverse(shape, patch):
    x = torch.randn(shape)
    patches = patchify(x, patch)
    grid = tuple(s // p for s, p in zip(shape[2:], patch))
    assert patches.shape == (shape[0], torch.Size(grid).numel(), shape[1] * torch.Size(patch).numel())
    assert torch.equal(unpatchify(patches, patch, grid, shape[1]), x)
    # token n is row-major over the grid, its vector the (C, *patch) block flattened
    for n in (0, patches.shape[1] // 2, patches.shape[1] - 1):
        pos = torch.unravel_index(torch.tensor(n), grid)
        block = x[1 if shape[0] > 1 else 0][(slice(None),) + tuple(
            slice(int(i) * p, (int(i) + 1) * p) for i, p in zip(pos, patch))]
        assert torch.equal(patches[1 if shape[0] > 1 else 0, n], block.flatten())


def test_patchify_rejects_indivisible_input():
    with pytest.raises(ValueError, match=r"input size \(50, 32\) is not divisible by patch"):
        patchify(torch.randn(1, 1, 50, 32), (16, 16))


@pytest.mark.parametrize("shape, patch", [((3, 1, 64, 48), (16, 16)),
                                          ((2, 3, 4, 32, 48), (2, 16, 16))])
def test_both_orders_embed_the_same_visible_tokens(shape, patch):
    x = torch.randn(shape)
    first = PatchEmbed(shape[1], patch, 24, mask_first=True)
    after = PatchEmbed(shape[1], patch, 24, mask_first=False)
    after.load_state_dict(first.state_dict())
    num_tokens = patchify(x, patch).shape[1]
    pos = torch.randn(num_tokens, 24)
    ids = random_masking((2, shape[0]), num_tokens, 0.75)
    conv_tokens = after.proj(x).flatten(2).transpose(1, 2) + pos
    expected = torch.stack([torch.stack([conv_tokens[b, ids.keep[v, b]] for b in range(shape[0])])
                            for v in range(2)])
    torch.testing.assert_close(first(x, ids.keep, pos), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after(x, ids.keep, pos), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first(x, None, pos), conv_tokens)
