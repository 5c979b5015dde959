"""neox-progressive: build a GPT-NeoX model family by progressive training (Yano et al. 2025)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "neox_progressive" / "__init__.py").read_text()).group(1)

# Ranges admit what GPT-NeoX environments pin (numpy<2, transformers 4.38, lm_eval 0.4.1)
# as well as current releases. torch is installed first by the README (torch==2.13.0 on CPU);
# a range it satisfies makes pip install nothing more.
CORE = ["torch>=2.3.0a0",  # admits the pre-release builds of NeoX's containers (nvcr 24.02: 2.3.0a0; 25.04: 2.7.0a0)
        "numpy>=1.24", "pyyaml>=6.0", "tqdm>=4.60", "safetensors>=0.4"]
EXTRAS = {
    "eval": ["lm-eval>=0.4.1,<0.5", "transformers>=4.38", "sentencepiece>=0.1.99", "tokenizers>=0.15"],
    "deepspeed": ["deepspeed>=0.12"],
    "wandb": ["wandb>=0.15"],
    "plot": ["matplotlib>=3.5"],
    "test": ["pytest>=7", "ruff>=0.4", "accelerate>=0.26"],  # accelerate: lm-eval's HFLM, the cross-check of the eval tests
}
EXTRAS["all"] = sorted({req for name in ("eval", "deepspeed", "wandb", "plot") for req in EXTRAS[name]})

setup(
    name="neox-progressive",
    version=VERSION,
    description="Progressive training of LLM families for GPT-NeoX: bert2BERT expansion, budgets, evaluation",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["neox_progressive", "neox_progressive.*"]),
    package_data={"neox_progressive": ["data/*", "data/**/*", "neox_args/*.json", "examples/*.yml"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["neox-progressive=neox_progressive.cli:main"]},
    license="Apache-2.0",
)
