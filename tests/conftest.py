import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    neox = os.environ.get("NEOX_DIR")
    cuda = torch.cuda.is_available()
    for item in items:
        if "neox" in item.keywords and not neox:
            item.add_marker(pytest.mark.skip(reason="needs a GPT-NeoX checkout: set NEOX_DIR"))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
