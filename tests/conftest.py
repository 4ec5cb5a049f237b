"""Test configuration: every test starts from the same seed, on one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tests run on small shared machines; one thread is faster and steadier
