"""megatron-lst: Latent Speech-Text Transformer pretraining on Megatron-core."""

from setuptools import find_packages, setup

# `kernels/` is imported as `lst_kernels`: a top-level `kernels` module would
# collide with the Hugging Face package of that name.
packages = find_packages(include=["megatron_lst", "megatron_lst.*"])
packages += ["lst_kernels"] + [
    "lst_kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="megatron-lst",
    version="0.1.0",
    description="Latent Speech-Text Transformer pretraining with Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"lst_kernels": "kernels"},
    install_requires=[
        # A loose `torch` would pull a multi-GB CUDA build onto CPU machines
        # that already have a CPU wheel. 2.5 brought SDPA's `enable_gqa` (grouped key/value heads
        # without copies); tested: 2.13 (CPU, CI) and 2.11 (GPU).
        "torch>=2.5",
        "megatron-core>=0.16",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "psutil>=5.9",  # dist-checkpoint saving hangs without it
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "jiwer>=4.0",  # WER/CER of the ASR and TTS evaluation
    ],
    extras_require={
        # apex is built from source: see README "GPU extras".
        "gpu": ["flash-attn>=2.6", "transformer-engine[pytorch]>=2.0"],
        # Data tools and the demo corpus (eSpeak NG ships inside espeakng-loader).
        "data": ["tokenizers>=0.15.1", "scipy>=1.10", "scikit-learn>=1.3", "threadpoolctl>=3.1",
                 "espeakng-loader>=0.2", "matplotlib>=3.7"],
        # Audio -> units (megatron_lst/audio, tools/extract_units.py): HuBERT through
        # transformers; soundfile reads flac (integer-PCM wav needs nothing).
        "audio": ["transformers>=5.0", "soundfile>=0.12"],
        "logging": ["tensorboard>=2.14", "wandb>=0.16"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.5"],
    },
    entry_points={
        "console_scripts": [
            "lst-train=megatron_lst.training.cli:main",
            "lst-eval=megatron_lst.evaluation.eval_cli:eval_main",
            "lst-generate=megatron_lst.evaluation.generate_cli:generate_main",
            "lst-import-eval=megatron_lst.evaluation.importers:import_main",
            "lst-convert=megatron_lst.checkpoint.cli:main",
        ]
    },
)
