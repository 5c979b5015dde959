import os

# Tests never download (an offline cluster node is the case to pass): Hugging Face libraries read these at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    neox = os.environ.get("NEOX_DIR")
    cuda = torch.cuda.is_available()
    for item in items:
        if "neox" in item.keywords and not neox:
            item.add_marker(pytest.mark.skip(reason="needs a GPT-NeoX checkout: set NEOX_DIR"))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
