"""Install glag: ``pip install -e .`` (CPU) or ``pip install -e .[gpu]`` (adds CuPy, faiss-gpu).

torch is pinned to the CPU build 2.13.0 on purpose: an unpinned torch resolves to a
multi-GB CUDA build. The top-level ``kernels/`` and ``tools/`` folders install as ``glag.kernels`` and
``glag.tools``.
"""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "glag" / "__init__.py").read_text()).group(1)

setup(
    name="glag",
    version=VERSION,
    description="GLAG (Gradual Balanced Loss + Adaptive Feature Generator) for long-tailed "
    "classification, as a feature-space pipeline",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["glag", "glag.data", "glag.models", "glag.kernels", "glag.tools"],
    # kernels/ and tools/ sit at the top level of the repo but install inside glag, so the
    # console scripts can import the CLIs while glag/ itself stays free of argparse.
    package_dir={"glag.kernels": "kernels", "glag.tools": "tools"},
    package_data={"glag.kernels": ["*.cu"]},
    install_requires=[
        "torch==2.13.0",
        "numpy",
        "numba",
        "scipy",  # the BLAS that numba's np.dot calls in the CPU sampling kernel
        "faiss-cpu",
        "h5py",
        "tqdm",
        "matplotlib",
        "pillow",
        "pytest",
    ],
    extras_require={"gpu": ["cupy-cuda12x", "faiss-gpu-cu12"]},
    entry_points={
        "console_scripts": [
            "glag-train=glag.tools.train_stage1:cli",
            "glag-extract=glag.tools.extract:cli",
            "glag-afg-train=glag.tools.afg_train:cli",
            "glag-bench=glag.tools.bench_kernel:cli",
            "glag-bench-stage2=glag.tools.bench_stage2:cli",
            "glag-pipeline=glag.tools.pipeline:cli",
            "glag-experiment=glag.tools.experiment:cli",
        ]
    },
)
