"""Learning-rate schedule: linear warm-up, then cosine down to min_lr_ratio."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from distlab.config import Config
from distlab.optim import lr_factor


@given(steps=st.integers(1, 500), warmup=st.integers(0, 50), ratio=st.floats(0, 1))
def test_schedule_shape(steps: int, warmup: int, ratio: float) -> None:
    config = Config(steps=steps, warmup_steps=warmup, min_lr_ratio=ratio)
    factors = [lr_factor(s, config) for s in range(steps)]
    warm, decay = factors[:warmup], factors[warmup:]
    assert all(0 < f <= 1 for f in warm) and warm == sorted(warm)
    assert all(ratio - 1e-12 <= f <= 1 + 1e-12 for f in decay)
    assert all(a >= b - 1e-12 for a, b in zip(decay, decay[1:], strict=False))
    if decay:
        assert abs(decay[0] - 1.0) < 1e-12  # the peak lr right after warm-up
