from setuptools import find_packages, setup

JAX = "0.10.2"  # one pin for jax, jaxlib and the accelerator extras below
TORCH = "torch==2.13.0"

setup(
    name="rrm-jax",
    version="0.1.0",
    description="JAX-native toolkit for Reward Reasoning Models: Qwen2 in Flax NNX, sampling, judging, GRPO.",
    python_requires=">=3.11",
    packages=find_packages(include=["rrm_jax", "rrm_jax.*"]),
    package_data={"rrm_jax": ["configs/*.yaml", "data/*.json"]},
    install_requires=[
        f"jax=={JAX}",
        f"jaxlib=={JAX}",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "datasets==5.2.0",
        "transformers==5.24.0",
        "safetensors==0.8.0",
        "tokenizers==0.23.3",
        "numpy==2.4.6",
        "pyyaml==6.0.4",
        "tqdm==4.70.1",
        "jinja2==3.1.6",
        "matplotlib==3.11.2",
        "tensorboardX==2.6.5",
        "psutil==7.2.2",
    ],
    extras_require={
        # torch is only the reference implementation: HF parity tests and `bench sample --compare-hf`
        "hf": [TORCH],
        # the tests, and ruff: `make test` fails on a lint or format error first (ruff.toml)
        "test": ["pytest==9.2.0", "ruff==0.17.5", TORCH],
        # accelerators: the same jax with its plugin; cuda12 runs on more drivers than cuda13 (driver >= 580)
        "cuda": [f"jax[cuda12]=={JAX}"],
        "cuda13": [f"jax[cuda13]=={JAX}"],
        "tpu": [f"jax[tpu]=={JAX}"],
        # gs:// run folders and exports (etils.epath reads and writes a bucket through gcsfs)
        "gcs": ["gcsfs==2026.8.2"],
    },
    entry_points={"console_scripts": ["rrm-jax=rrm_jax.cli:main"]},
)
