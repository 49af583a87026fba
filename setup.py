from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="neural_em",
    version="0.1.0",
    description="Neural Expectation Maximization (N-EM, RNN-EM) in TensorFlow 2 / Keras 3",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["neural_em", "neural_em.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        "test": ["pytest>=8", "jax[cpu]>=0.4.30"],
        "mongo": ["pymongo>=4"],
    },
)
