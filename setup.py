from setuptools import find_packages, setup

setup(
    name="fastmavil",
    version="0.1.0",
    description="Masked audio-video pre-training (DiffMAViL) with Triton kernels",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastmavil", "fastmavil.*", "kernels", "kernels.*",
                                    "bench", "bench.*"]),
    # torch below 2.14: on the project's CPU machines pip then takes the local CPU build (2.13)
    # instead of downloading a multi-GB CUDA build; GPU users get the CUDA wheel as usual.
    install_requires=["torch>=2.4,<2.14", "numpy", "rich"],
    extras_require={"dev": ["pytest>=7"]},
    entry_points={"console_scripts": ["fastmavil-flops=fastmavil.flops:main"]},
)
