"""mmjax: multimodal vision-language pretraining in JAX/Flax."""

import setuptools

# The optional parts; `dev` is everything the test suite needs (README, "Test").
TFDS = ["tensorflow-datasets>=4.9.7,<4.10"]  # `kind="tfds"` data sources only
# libtpu's compiler, for `mmjax.compile` (TPU fit checks on any host); the version
# jax[tpu] pairs with the jax below.
TPU_COMPILE = ["libtpu==0.0.42.1; sys_platform == 'linux' and platform_machine == 'x86_64'"]
TEST = [
    "pytest>=8,<10",
    "pytest-xdist>=3.5,<4",
    # The reference implementations of the checkpoint-conversion parity tests; the CPU
    # build of torch.
    "torch==2.13.0",
    "transformers>=4.57,<6",
    # The LoRA parity tests (tests/test_peft.py): peft's adapters, files and logits.
    "peft==0.21.0",
    # open_flamingo's modules import it; open_flamingo itself pins torch 2.0 and is
    # installed without its dependencies (README, "Test").
    "einops-exts==0.0.4",
    # The notebooks run in a real kernel (tests/test_notebooks.py) and plot.
    "nbclient>=0.10,<0.12",
    "nbformat>=5.10,<6",
    "ipykernel>=6.29,<8",
    "matplotlib>=3.8,<4",
]

setuptools.setup(
    name="mmjax",
    version="0.1.0",
    description=("Multimodal vision-language pretraining in JAX/Flax: Flamingo, BLIP-2, "
                 "CLIP/SigLIP, MedCLIP and LLaVA (training, LoRA, sharding, evaluation, "
                 "checkpoint conversion)."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The recipes live in the top-level configs/ folder (`--config=configs/flamingo.py`)
    # and install as `mmjax.configs`, so that mmjax claims no global `configs` package.
    packages=setuptools.find_packages(include=["mmjax", "mmjax.*"]) + ["mmjax.configs"],
    package_dir={"mmjax.configs": "configs"},
    package_data={"mmjax": ["data/assets/*.model", "data/assets/*.json",
                           "data/assets/findings_world/*.json",
                           "data/assets/mammo_world/*.json"]},
    python_requires=">=3.10",
    # Upper bounds: the newest release of each that the test suite has passed with (jax
    # 0.10.2, flax 0.12.8, orbax-checkpoint 0.12.8, grain 0.2.18). Releases after those
    # (jax 0.11 and 0.12) have not been tested: Orbax's and Grain's checkpoint formats and
    # JAX's sharding API are what the exact-resume and sharding tests pin down, and they
    # change between minor releases.
    install_requires=[
        "jax>=0.6,<0.11",
        "jaxlib>=0.6,<0.11",
        "flax>=0.10.4,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.10,<0.3",
        "array-record>=0.8.1,<0.9",
        "msgpack>=1.0,<2",
        "pillow>=10.1,<14",
        "einops>=0.8,<0.9",
        "ml-collections>=1.0,<1.2",
        "sentencepiece>=0.2,<0.3",
        "absl-py>=2.1,<3",
        "tensorboardX>=2.6,<3",
        "numpy>=1.26,<3",
        "safetensors>=0.4,<1",  # reading Hugging Face checkpoints (mmjax.convert)
        "tokenizers>=0.20,<1",  # their tokenizers (mmjax.data.tokenizer.HFTokenizer)
        # Their chat templates, rendered as transformers renders them (LLaVA's
        # `chat_template` conversation format, mmjax.data.conversation).
        "jinja2>=3.1,<4",
        # The COCO caption toolkit's PTB tokenizer (Java) for CIDEr and BLEU as published
        # (mmjax.evaluate.metrics; without Java a pure-Python tokenizer stands in).
        "pycocoevalcap>=1.2,<1.3",
        # MMBCD's keyword masking ranks the training texts' words by tf-idf exactly as its
        # reference does, with TfidfVectorizer and its English stop words (mmjax.data.keywords).
        "scikit-learn>=1.3,<2",
    ],
    extras_require={
        "tfds": TFDS,
        "tpu-compile": TPU_COMPILE,
        "dev": TEST + TFDS + TPU_COMPILE,
    },
)
