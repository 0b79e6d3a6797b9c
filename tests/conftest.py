"""Shared fixtures: the committed data set, the Berglund set, a tiny tokenizer and a tiny saved Llama.

The session-scoped fixtures are built once per test run (well under 2 s together). Treat
`tiny_model_dir` as read-only: copy it (`shutil.copytree`) before writing into it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
# The real Berglund et al. experiment-1 files live next to the repository (not committed here).
BERGLUND_DIR = REPO_ROOT.parent / "shared" / "data" / "reversal_curse"

TINY_VOCAB_SIZE = 300
TINY_LLAMA = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
)


def _training_texts() -> list[str]:
    # Plain json rather than bico.data, so a bug in the loader does not break every test module.
    with open(DATA_DIR / "all_prompts_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row["prompt"] + row["completion"] for row in rows]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The project's own generated name-description set committed in `data/`."""
    return DATA_DIR


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory) -> Path:
    """The first 24 rows of every file of data/ (randomized files stay aligned with their test files)."""
    out = tmp_path_factory.mktemp("small_data")
    for path in DATA_DIR.glob("*.jsonl"):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        (out / path.name).write_text("".join(lines[:24]), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def berglund_dir() -> Path:
    """The Berglund et al. set in `<repo>/../shared/data/reversal_curse`; skips the test if absent."""
    if not (BERGLUND_DIR / "all_prompts_train.jsonl").exists():
        pytest.skip(f"Berglund data not found in {BERGLUND_DIR}")
    return BERGLUND_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (vocab 300, `<pad>`=0 `<s>`=1 `</s>`=2 `<unk>`=3) trained on the committed training set."""
    from bico.scratch import train_tokenizer

    return train_tokenizer(_training_texts(), vocab_size=TINY_VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """`tiny_tokenizer` + a random LlamaForCausalLM (hidden 32, 2 layers, 4 heads, 2 kv heads,
    intermediate 64, seed 0), both saved with `save_pretrained`. Read-only: copy before writing."""
    import torch
    from transformers import LlamaForCausalLM

    from bico.scratch import small_llama_config

    output_dir = tmp_path_factory.mktemp("tiny_llama")
    config = small_llama_config(tiny_tokenizer, **TINY_LLAMA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    tiny_tokenizer.save_pretrained(output_dir)
    model.save_pretrained(output_dir)
    return output_dir


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for `accelerate launch --main_process_port`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
