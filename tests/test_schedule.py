import pytest

from fastmavil.config import MaskConfig
from fastmavil.masking import num_visible
from fastmavil.schedule import mask_ratio


def test_linear_curriculum_endpoints_and_mean():
    mask = MaskConfig(schedule="linear", start=0.9, end=0.8)
    ratios = [mask_ratio(mask, e, 60) for e in range(60)]
    assert ratios[0] == 0.9 and ratios[-1] == pytest.approx(0.8)
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    assert sum(ratios) / 60 == pytest.approx(0.85)
    assert mask_ratio(MaskConfig(), 30, 60) == 0.8
    assert num_visible(512, mask_ratio(mask, 0, 60)) == 51
