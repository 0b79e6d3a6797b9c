"""Shared fixtures: the committed data set, the Berglund set, tiny tokenizers and a tiny saved Llama.

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


def _sentencepiece_tokenizer(legacy: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback()])
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    # "_" as a word of its own, as in Llama 2's vocabulary ("▁_"): the demask marker.
    texts = _training_texts() + ["a _ b _ c"] * 200
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False))
    if legacy:  # the same vocabulary, tokenized the way Llama 2's fast tokenizer does
        tokenizer.pre_tokenizer = None
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def sentencepiece_tokenizers() -> dict:
    """Two SentencePiece-style BPE tokenizers with byte fallback (`<unk>`=0 `<s>`=1 `</s>`=2, BOS added), trained on
    the committed training set: `"metaspace"` splits words with a `▁` pre-tokenizer (Llama 2 with legacy=False,
    Mistral), `"llama2-legacy"` writes `▁` in a normalizer and does not pre-tokenize (Llama 2's fast tokenizer)."""
    return {"metaspace": _sentencepiece_tokenizer(legacy=False), "llama2-legacy": _sentencepiece_tokenizer(legacy=True)}


@pytest.fixture(params=["byte-level", "metaspace", "llama2-legacy"])
def each_tokenizer(request, tiny_tokenizer, sentencepiece_tokenizers):
    """`tiny_tokenizer` (byte-level BPE, as GPT-2, Llama 3, SmolLM2) and each of `sentencepiece_tokenizers`, a test each."""
    return tiny_tokenizer if request.param == "byte-level" else sentencepiece_tokenizers[request.param]


@pytest.fixture(scope="session")
def answer_names() -> list[str]:
    """The names the committed training set answers with (`bico.reverse.collect_names` over its completions)."""
    from bico.reverse import collect_names

    with open(DATA_DIR / "all_prompts_train.jsonl", encoding="utf-8") as f:
        return collect_names(json.loads(line)["completion"] for line in f if line.strip())


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer as `bico-fetch-smollm2` converted it; skips the test when it is not cached."""
    import transformers
    from transformers import AutoTokenizer

    from bico.pretrained import cache_dir

    # Any release's conversion has the same vocabulary; this release's own is preferred.
    found = sorted(cache_dir().glob("transformers-*/SmolLM2-135M-Instruct/tokenizer.json"),
                   key=lambda path: transformers.__version__ in str(path))
    if not found:
        pytest.skip(f"no converted SmolLM2 tokenizer in {cache_dir()} (run bico-fetch-smollm2)")
    return AutoTokenizer.from_pretrained(found[-1].parent)


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
