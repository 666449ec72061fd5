from setuptools import find_packages, setup

setup(
    name="shared-attention-sd",
    version="0.1.0",
    description="Stable Diffusion v1 in the CompVis layout, with batch-shared self-attention for consistent subjects",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={"ldm.app": ["static/*"]},  # the web page's stylesheet and script
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "omegaconf>=2.1",
        "einops",
        "safetensors",
        "tqdm",
        "pillow",
        # only for the CLIP BPE vocabulary file it ships (bpe_simple_vocab_16e6.txt.gz); never imported
        "open-clip-torch",
    ],
    extras_require={
        # parity tests compare against independent implementations
        # (selenium drives Debian's chromium + chromium-driver in the web page's browser test; .ci/run installs them)
        # (peft: diffusers' load_lora_weights, the reference of the LoRA parity tests, needs it)
        "test": ["pytest", "diffusers>=0.30", "transformers>=4.40", "pytorch-lightning>=2.0", "ftfy", "selenium>=4.11",
                 "peft>=0.15"],
        # training the demo model and the first stage
        "train": ["pytorch-lightning>=2.0"],
        # DINO / CLIP feature extractors for evaluating real SD checkpoints
        "eval": ["transformers>=4.40"],
        # batch-shared attention in a diffusers StableDiffusionPipeline (ldm/sharing/diffusers_processors.py)
        "diffusers": ["diffusers>=0.30", "transformers>=4.40"],
    },
)
