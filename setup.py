"""Packaging for keras-kfac.

TensorFlow is deliberately not a hard requirement: users pick `tensorflow`
(GPU) or `tensorflow-cpu` themselves, or through the `gpu` / `cpu` extras.
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="keras-kfac",
    version="0.1.0",
    description="K-FAC (Kronecker-factored approximate curvature) optimizer for Keras 3 on TensorFlow",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_kfac", "keras_kfac.*"]),
    python_requires=">=3.10",
    # Keras as far as the tests cover it: keras_kfac.compat reaches private
    # Keras surfaces checked on this release line.
    install_requires=["keras>=3.15,<3.16", "numpy"],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow>=2.16"],
        "benchmarks": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "test": ["pytest"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
