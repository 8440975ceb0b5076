import numpy as np
import torch

from fastmavil.models.pos_embed import sincos_1d, sincos_2d, sincos_grid, sincos_video


def test_sincos_1d_values():
    emb = sincos_1d(8, torch.arange(3))
    omega = 1.0 / 10000 ** (torch.arange(4) / 4.0)
    torch.testing.assert_close(emb[2], torch.cat([(2 * omega).sin(), (2 * omega).cos()]))


def test_2d_halves_encode_column_and_row():
    emb = sincos_2d(16, 4, 3)
    assert emb.shape == (12, 16)
    cols, rows = emb.view(4, 3, 16)[..., :8], emb.view(4, 3, 16)[..., 8:]
    assert torch.equal(cols[0], cols[3])        # same column -> same first half
    assert torch.equal(rows[:, 0], rows[:, 2])  # same row -> same second half
    assert len({tuple(e.tolist()) for e in emb}) == 12


def test_2d_equals_mae_layout_on_the_audio_grid():
    """MAE / AudioMAE build the grid from (column, row) coordinates, x first: the first half
    encodes the column. Written out here with numpy for the 64 x 8 grid at width 768."""
    rows, cols, dim = 64, 8, 768
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))

    def one(pos):
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    x, y = np.meshgrid(np.arange(cols), np.arange(rows))  # 'xy': x varies along a row
    expected = np.concatenate([one(x.reshape(-1)), one(y.reshape(-1))], axis=1)
    torch.testing.assert_close(sincos_2d(dim, rows, cols), torch.from_numpy(expected).float(),
                               rtol=0, atol=1e-6)


def test_video_is_temporal_plus_spatial():
    emb = sincos_video(16, 3, 2, 2).view(3, 4, 16)
    spatial, temporal = sincos_2d(16, 2, 2), sincos_1d(16, torch.arange(3))
    torch.testing.assert_close(emb, temporal[:, None] + spatial[None])
    # separable: the change between two frames is the same at every spatial position
    diff = emb[2] - emb[0]
    torch.testing.assert_close(diff, diff[:1].expand(4, -1))
    assert sincos_grid(16, (3, 2, 2)).shape == (12, 16) and sincos_grid(16, (5, 2)).shape == (10, 16)
