"""InstSynth: instance-level synthetic data for instance segmentation (Nguyen et al., MAPR 2024).

Install with ``pip install -e .`` (or ``python setup.py build develop``, as in the paper's README).
Requirements are ranges so that GPU users keep their own CUDA build of torch; the Makefile pins the
exact versions used by this project's own virtual environment and CI.
"""
from setuptools import find_packages, setup

setup(
    name="instsynth",
    version="0.1.0",
    description="Synthesise instance-segmentation training data by prompt-guided instance inpainting",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["instsynth", "instsynth.*"]),
    include_package_data=True,
    install_requires=[
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "pillow>=9.5",
        "torch>=2.1",
        "torchvision>=0.16",
        "diffusers>=0.27",
        "transformers>=4.40",
        "accelerate>=0.26",
        "safetensors>=0.4",
        "pycocotools>=2.0.7",
        "cityscapesscripts>=2.2",
        "scipy>=1.10",
        "pytorch-fid>=0.3",
        "scikit-image>=0.21",
        "matplotlib>=3.7",
        "tqdm>=4.64",
        "pyyaml>=6.0",
        "fvcore>=0.1.5",  # CfgNode and the _BASE_ loader, as Detectron2
    ],
    # shapely: Detectron2's gtFine_polygons.json loader, used by tests/test_detectron2.py
    extras_require={"test": ["pytest>=7.4", "pytest-timeout>=2.2", "shapely>=2.0", "import-linter>=2.0"]},
)
