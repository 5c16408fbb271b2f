"""Fixtures shared by the federated tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Workers train with their share of the threads (``threads // workers``, at least 1); a
    comparison with an in-turn run needs the same count on both sides."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
