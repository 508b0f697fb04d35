"""DataConfig and IntensityConfig validate themselves (issue 13).

One line naming data.<key>, the range and the value."""

from __future__ import annotations

import pytest

from medssl.config import SPLIT_CHOICES, DataConfig, build_config
from medssl.data.readers import INTENSITY_MODES, IntensityConfig
from medssl.errors import ConfigError


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"num_workers": -1}, r"^data\.num_workers must be >= 0, got -1$"),
        ({"image_size": 0}, r"^data\.image_size must be >= 1, got 0$"),
        ({"image_size": -32}, r"^data\.image_size must be >= 1, got -32$"),
        ({"split": "test"}, r"^data\.split must be one of train, train\+val, all, got 'test'$"),
        ({"spec": "  "}, r"^data\.spec must name a dataset"),
        ({"intensity": {"mode": "hu"}},
         r"^data\.intensity\.mode must be one of auto, window, percentile, minmax, bitdepth, zscore, got 'hu'$"),
        ({"intensity": {"percentiles": [99, 1]}},
         r"^data\.intensity\.percentiles must be \[low, high\] with low < high, got \[99\.0, 1\.0\]$"),
        ({"intensity": {"percentiles": [1, 101]}}, r"^data\.intensity\.percentiles must be in \[0, 100\], got 101\.0$"),
        ({"intensity": {"percentiles": [-1, 50]}}, r"^data\.intensity\.percentiles must be in \[0, 100\], got -1\.0$"),
        ({"intensity": {"percentiles": [float("nan"), 50]}}, r"^data\.intensity\.percentiles must be a finite number"),
        ({"intensity": {"window": [40, 0]}},
         r"^data\.intensity\.window must be \[centre, width\] with finite values and width > 0, got \[40\.0, 0\.0\]$"),
        ({"intensity": {"window": [float("inf"), 400]}}, r"^data\.intensity\.window must be \[centre, width\]"),
    ],
)
def test_bad_data_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"data": data})


def test_good_values_and_constants() -> None:
    cfg = build_config({"data": {"num_workers": 0, "image_size": 1, "split": "train+val", "follow_symlinks": True,
                                 "intensity": {"mode": "window", "window": [40, 400], "percentiles": [0, 100]}}})
    assert cfg.data.follow_symlinks and cfg.data.intensity.window == (40.0, 400.0)
    assert SPLIT_CHOICES == ("train", "train+val", "all") and "zscore" in INTENSITY_MODES
    assert DataConfig().follow_symlinks is False
    with pytest.raises(ConfigError, match=r"^mode must be one of"):  # direct construction names the field
        IntensityConfig(mode="x")
