"""rat — adversarial training and robustness evaluation of image classifiers at ImageNet scale."""

__version__ = "0.1.0"
