"""rat: adversarial training and robustness evaluation of image classifiers at ImageNet scale."""
from setuptools import find_packages, setup

# Ranges are the ones rat is tested with (see README, "Installation"). ffcv 1.0.2 needs the system packages
# g++, pkg-config, libopencv-dev and libturbojpeg0-dev to build (tools/bootstrap.sh installs them).
INSTALL_REQUIRES = [
    "torch>=2.5,<2.16",
    "timm>=1.0.15,<1.1",
    "ffcv==1.0.2",
    "Pillow>=10",  # ffcv imports PIL but does not declare it
    "numba>=0.60,<0.69",
    "numpy>=1.26,<3",
    "fastargs==1.2.0",
    "pyautoattack==0.2.0",  # PyPI packaging of fra31/auto-attack; wrapped in rat/eval/autoattack.py
    "GPUtil==1.4.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "PyYAML>=6",
    "scikit-learn>=1.3",  # ships the real images the embedded demo dataset is built from
    "brevitas>=0.13.4,<0.14",  # INT and minifloat fake quantization in rat.quant (tested: 0.13.4 with torch 2.14)
    "scipy>=1.11",  # rat.quant: Jensen-Shannon divergence, curve fit, Spearman rho
]

# Optional extras (tested: tensorboard 2.21, submitit 1.5.4); the dev extra includes them, so the tests cover them.
TENSORBOARD = ["tensorboard>=2.14"]
SUBMITIT = ["submitit>=1.5,<2"]

setup(
    name="rat",
    version="0.1.0",
    description="Adversarial training and AutoAttack evaluation of ConvStem ViTs and ConvNeXts on ImageNet",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["rat", "rat.*"]),
    package_data={"rat.eval": ["assets/*"]},  # RobustBench's ImageNet subset list (see rat/eval/assets/NOTICE.md)
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.6,<4",
            "hypothesis>=6.100",
            "ruff>=0.6",
            *TENSORBOARD,
            *SUBMITIT,
        ],
        "tensorboard": TENSORBOARD,  # --logging.tensorboard 1 (torch.utils.tensorboard writes the event files)
        "slurm": SUBMITIT,  # runner_aa_eval.py --launcher slurm
    },
    entry_points={
        "console_scripts": [
            "rat-train=rat.train.__main__:main",
            "rat-eval=rat.eval.cli:main",
        ],
    },
)
