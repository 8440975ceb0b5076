from setuptools import find_packages, setup

setup(
    name="fastmavil",
    version="0.1.0",
    description="Masked audio-video pre-training (DiffMAViL) with Triton kernels",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tomllib
    packages=find_packages(include=["fastmavil", "fastmavil.*", "kernels", "kernels.*",
                                    "bench", "bench.*"]),
    # torch below 2.14: on the project's CPU machines pip then takes the local CPU build (2.13)
    # instead of downloading a multi-GB CUDA build; GPU users get the CUDA wheel as usual.
    install_requires=[
        "torch>=2.6,<2.14", "numpy", "rich",
        "av>=14",          # PyAV: video encode/decode for prep, synth and the reference loader
        "soundfile",       # FLAC audio
        "nvidia-ml-py",    # pynvml: GPU utilisation in metrics and benchmarks
        'triton; platform_system == "Linux"',  # kernels (CUDA, or the CPU interpreter in tests)
        # NVIDIA DALI: GPU (and CPU, for VP9 + FLAC) decoding; wheels exist for Linux x86_64 only
        'nvidia-dali-cuda120; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    # dev: the tests (kaldi-native-fbank checks the fbank; tensorboard, the metrics writer's events)
    extras_require={"dev": ["pytest>=7", "kaldi-native-fbank", "tensorboard"]},
    entry_points={"console_scripts": [
        "fastmavil-train=fastmavil.train.pretrain:main",
        "fastmavil-finetune=fastmavil.train.finetune:main",
        "fastmavil-flops=fastmavil.flops:main",
        "fastmavil-synth=fastmavil.data.synth:main",
        "fastmavil-prep=fastmavil.data.prep:main",
    ]},
)
