"""slmkd: distil chain-of-thought reasoning from a large teacher into small students."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "slmkd" / "_version.py").read_text(), version)

setup(
    name="slmkd",
    version=version["__version__"],
    description="Stable, memory-bounded knowledge distillation and CasCoD for small reasoning LMs",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["slmkd", "slmkd.*"]),
    include_package_data=True,
    install_requires=[
        # Floor only: Colab's preinstalled torch must satisfy it (never reinstall torch there).
        "torch>=2.1",
        # The trainer subclasses Trainer internals (num_items_in_batch, scheduler built after the
        # optimizer is wrapped, ...): the range slmkd.training.trainer.SUPPORTED_TRANSFORMERS
        # checks at run time and scripts/ci_floor.sh tests at its floor.
        "transformers>=5.0,<6",
        "datasets>=2.20",
        "accelerate>=0.34",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "ipywidgets>=7.6",
        "tqdm>=4.66",
        "scipy>=1.10",
        "statsmodels>=0.14",
        "numpy>=1.24",
    ],
    extras_require={
        "dev": ["pytest>=8", "nbmake>=1.5", "ipykernel>=6", "hypothesis>=6.100", "ruff>=0.5",
                "nbformat>=5.9", "psutil>=5.9", "peft>=0.11",
                # runs on CPU too (NF4 teacher, 8-bit AdamW: tests/test_bnb_cpu.py); transformers 5
                # needs >= 0.46.1 for 4-bit
                "bitsandbytes>=0.46.1",
                # tests/test_scoring_harness.py checks our strict/flexible against its filters
                "lm-eval==0.4.13"],
        "quant": ["bitsandbytes>=0.46.1"],
        "lora": ["peft>=0.11"],
        "vllm": ["vllm>=0.6"],
    },
    entry_points={"console_scripts": ["slmkd=slmkd.cli:main"]},
)
