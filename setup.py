"""lspretrain: pretraining layer-specialized Vision Transformers at scale.

torch is pinned by the caller's constraints file (see README / .ci/run): never let pip pick
a newer torch, it drags in gigabytes of CUDA wheels.
"""
from setuptools import find_packages, setup

setup(
    name="lspretrain",
    version="0.1.0",
    description="Layer-specialized ViT pretraining (DINOv2 / DeiT-III) with FSDP2, DeepSpeed, WebDataset and SLURM",
    packages=find_packages(include=["lspretrain", "lspretrain.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pillow",
        "pyyaml",
        "omegaconf>=2.3",
        "webdataset>=0.2.86",
        "submitit>=1.5",
        "tensorboard>=2.14",
        "fvcore>=0.1.5",
        "safetensors>=0.4",
        "kornia>=0.7",
        "simplejpeg",
        "deepspeed>=0.14",
    ],
    extras_require={
        # transformers: the HF export is checked by loading it with Dinov2Model (it must stay
        # torchvision-free: never add torchvision or timm here).
        "test": ["pytest>=7", "pytest-timeout", "onnx", "onnxruntime", "transformers>=4.40", "huggingface_hub"],
    },
    entry_points={"console_scripts": ["lspretrain-train=lspretrain.train:main"]},
)
