"""megatron-moe-ext: FasterMoE-style expert parallelism as a megatron-core plugin."""

from setuptools import find_namespace_packages, setup

setup(
    name="megatron-moe-ext",
    version="0.1.0",
    description="Fast distributed Mixture-of-Experts training for megatron-core "
    "(FasterMoE smart schedule, shadow experts, topology-aware gate, performance model)",
    python_requires=">=3.10",
    # The shipped configs (configs/*.yaml, configs/models/, configs/clusters/) stay in the
    # repository's configs/ for users and become package data megatron_moe_ext/configs/ once
    # installed, where perf.cluster.CONFIG_DIR finds them (load_cluster('johnny') anywhere).
    # Namespace packages too: megatron_moe_ext/megatron/ and runtime/ have no __init__.py.
    packages=find_namespace_packages(include=["megatron_moe_ext", "megatron_moe_ext.*"],
                                     exclude=["*.__pycache__"])
    + ["megatron_moe_ext.configs"],
    package_dir={"megatron_moe_ext.configs": "configs"},
    package_data={"megatron_moe_ext.configs": ["*.yaml", "clusters/*.yaml", "models/*.yaml"]},
    py_modules=["pretrain_gpt_moe"],
    install_requires=[
        # Install a torch build first (CPU: `pip install torch==2.13.0`); any torch >= 2.4 that
        # megatron-core accepts satisfies this and nothing more is pulled.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",  # tested: 0.16.1 and 0.19.2 (CI)
        "numpy",
        "packaging",
        "PyYAML",
        "omegaconf>=2.3",
        "tokenizers>=0.15",
        # dist_checkpointing's async writer imports psutil without declaring it.
        "psutil",
        "matplotlib",
    ],
    extras_require={
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        # GPU clusters. apex is not on the package index: see README ("GPU setup").
        "gpu": ["transformer-engine[pytorch]", "nvidia-nccl-cu12"],
        "dev": ["pytest", "pytest-timeout"],
    },
)
