"""Every method's scores on fixed queries equal the values pinned before the layout redesign
(tests/pinned_scores.py): moving code must not move numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pinned_scores import PINNED, compute_scores


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return compute_scores(tmp_path_factory.mktemp("pinned"))


@pytest.mark.parametrize("method", json.loads(PINNED.read_text()).keys())
def test_scores_equal_the_pinned_values(fresh: dict[str, np.ndarray], method: str) -> None:
    pinned = np.asarray(json.loads(PINNED.read_text())[method])
    np.testing.assert_allclose(fresh[method], pinned, rtol=1e-6, atol=1e-6 * np.abs(pinned).max())
