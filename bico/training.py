"""The BICO fine-tuning loop: Accelerate, a 50/50 BICO/NTP mix per step, atomic checkpoints, LoRA merge.

BICO (Lv et al., arXiv 2311.07468, section 4.3) fine-tunes a causal LM where each optimizer step is,
with probability `p_bico`, a placeholder-mask denoising step run with bidirectional-RoPE attention
(`bico.bidirectional(model)`), and otherwise an ordinary next-token-prediction step. Nothing changes
at inference: the saved model is the plain causal model (LoRA adapters merged).

`train(TrainConfig(...))` runs, in order: Accelerator, seed, data, model (+ peft LoRA +
`patch_llama`), optimizer, scheduler, one `prepare()`, the loop, the final save and evaluation.
`scripts/finetune_bico.py` is its command line (`parse_config` builds the flags from `TrainConfig`).

Reproducibility: the data order is keyed on (seed, epoch), the objective on (seed, step) and each
row's mask on (seed, epoch, row), so a run resumed from a checkpoint, or spread over more processes
with the same global batch, repeats the same sequence of batches, objectives and masks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import accelerate
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, skip_first_batches
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, SchedulerType, get_scheduler

from .abi import AbiCollator, prepare_abi_model
from .collators import IGNORE_INDEX, BicoCollator, NtpCollator, choose_objective, encode_rows, row_seed
from .compat import enable_activation_checkpointing
from .data import TRAIN_FILE, load_train, resolve_tasks
from .patch import bidirectional, patch_llama, unpatch_llama
from .pretrained import is_gguf, resolve_model_path


logger = get_logger(__name__)

DEFAULT_MAX_STEPS = 1500  # the default run: ~5 min of training on 2 idle CPU cores, then ~1 min of evaluation
REVERSE_TASKS = "n2d-reverse,d2n-reverse"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint; its presence marks it complete
CHECKPOINT_PATTERN = re.compile(r"step_(\d+)")
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16", "fp8")
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")
# Fields that may differ between a run and its resumption without changing the trained weights.
RESUME_MAY_CHANGE = {
    "resume_from_checkpoint", "output_dir", "report_to", "logging_steps", "checkpointing_steps",
    "checkpoints_total_limit", "eval_tasks", "eval_every", "eval_every_tasks", "eval_batch_size", "eval_max_new_tokens",
}


@dataclass
class TrainConfig:
    """Every option of a training run; each field is a flag of `scripts/finetune_bico.py`."""

    # Model and data
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Llama-family model directory or .gguf file; None builds the small scratch model in output_dir/base"}
    )
    model_dtype: str = field(default="float32", metadata={"help": f"weights dtype when loading: {', '.join(DTYPE_CHOICES)}"})
    data_dir: str | None = field(default=None, metadata={"help": "name-description JSONL directory; None = the project's data/"})
    train_file: str = field(default=TRAIN_FILE, metadata={"help": "training file inside data_dir"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training rows"})
    max_length: int = field(default=256, metadata={"help": "tokens per sequence (BOS and EOS included); longer rows are cut"})
    output_dir: str = field(default="outputs/bico", metadata={"help": "checkpoints/, final/, logs and results go here"})
    seed: int = field(default=0, metadata={"help": "seeds the model init, data order, objective choice and masks"})

    # Objective
    objective: str = field(default="bico", metadata={"help": "bico (mixed with NTP by p_bico) or ntp"})
    p_bico: float = field(default=0.5, metadata={"help": "probability that a step uses `objective` rather than NTP"})
    mask_prob: float = field(default=0.15, metadata={"help": "BICO: per-token masking probability"})
    placeholder_id: int | None = field(default=None, metadata={"help": "BICO: id written over masked tokens; None = pad, else unk, else eos"})

    # Optimisation
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (1e-3 suits the scratch model; ~2e-5 a pre-trained Llama)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices (not on norms and biases)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0 turns it off"})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "any transformers.get_scheduler name"})
    min_lr_rate: float = field(default=0.1, metadata={"help": "floor of the *_with_min_lr schedules, as a fraction of the peak"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "warm-up as a fraction of the steps"})
    warmup_steps: int = field(default=0, metadata={"help": "warm-up steps; overrides warmup_ratio when > 0"})
    max_steps: int | None = field(default=None, metadata={"help": f"optimizer steps; wins over num_train_epochs (both None: {DEFAULT_MAX_STEPS})"})
    num_train_epochs: float | None = field(default=None, metadata={"help": "epochs, used when max_steps is None"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "rows per process per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})

    # Model memory and precision
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.01, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma-separated module names, or all-linear"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward (also in BICO steps)"})
    mixed_precision: str | None = field(default=None, metadata={"help": "no, fp16, bf16 or fp8; None = the accelerate launch setting"})
    cpu_threads: int | None = field(default=None, metadata={"help": "torch threads per process on CPU; None = physical cores / local processes"})

    # Checkpoints, logging, evaluation
    checkpointing_steps: int = field(default=500, metadata={"help": "save the training state every N steps; 0 = never"})
    checkpoints_total_limit: int | None = field(default=2, metadata={"help": "keep only the newest N checkpoints; None = all"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint directory, or latest (starts fresh if none)"})
    report_to: str | None = field(default=None, metadata={"help": "tracker for accelerator.init_trackers, e.g. tensorboard"})
    logging_steps: int = field(default=10, metadata={"help": "log loss and learning rate to the tracker every N steps"})
    eval_tasks: str = field(default="all", metadata={"help": "tasks evaluated after training (comma-separated, all, or none)"})
    eval_every: int = field(default=0, metadata={"help": "evaluate eval_every_tasks every N steps during training; 0 = never"})
    eval_every_tasks: str = field(default=REVERSE_TASKS, metadata={"help": "tasks of the evaluations during training"})
    eval_batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    eval_max_new_tokens: int = field(default=40, metadata={"help": "greedy decoding length"})

    def __post_init__(self):
        _check_choice("objective", self.objective, list(OBJECTIVES))
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, [s.value for s in SchedulerType])
        _check_choice("model_dtype", self.model_dtype, DTYPE_CHOICES)
        if self.mixed_precision is not None:
            _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_CHOICES)
        if not 0.0 <= self.p_bico <= 1.0:
            raise ValueError(f"`p_bico` must be in [0, 1], got {self.p_bico}.")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"`mask_prob` must be in (0, 1], got {self.mask_prob}.")
        positive = ["per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps"]
        positive += [name for name in ("max_steps", "num_train_epochs", "max_train_samples", "checkpoints_total_limit", "cpu_threads")
                     if getattr(self, name) is not None]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        for name in ("lora_r", "warmup_steps", "checkpointing_steps", "eval_every", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        for name in ("eval_tasks", "eval_every_tasks"):
            try:  # unknown task names fail here, not after training
                _task_list(getattr(self, name))
            except ValueError as error:
                raise ValueError(f"`{name}`: {error}") from None

    def eval_task_list(self) -> list[str]:
        """The final evaluation's tasks; empty for `none`."""
        return _task_list(self.eval_tasks)

    def eval_every_task_list(self) -> list[str]:
        return _task_list(self.eval_every_tasks)


def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(str, choices))}; got {value!r}.")


def _task_list(tasks: str) -> list[str]:
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    return [] if names in ([], ["none"]) else resolve_tasks(names)


@dataclass(frozen=True)
class Objective:
    """How one training objective makes its batches.

    Args:
        make_collator: `(tokenizer, config) -> collator`; the collator maps a list of examples
            (`{"input_ids", "index", "seed"}`) to the model's keyword arguments (with `labels`).
        bidirectional: Run the forward inside `bico.bidirectional(model)`.
        setup: Optional `(model, tokenizer, config) -> None`, called once after loading and before
            LoRA and `prepare()` (e.g. to add special tokens and resize the embeddings).
    """

    make_collator: Callable[[PreTrainedTokenizerBase, TrainConfig], Callable[[list[dict]], dict]]
    bidirectional: bool
    setup: Callable | None = None


# Objective name -> how to build its batches. `--objective X` mixes X with "ntp" by `p_bico`.
OBJECTIVES: dict[str, Objective] = {
    "ntp": Objective(lambda tokenizer, config: NtpCollator(tokenizer), bidirectional=False),
    "bico": Objective(
        lambda tokenizer, config: BicoCollator(tokenizer, config.mask_prob, config.placeholder_id, config.seed),
        bidirectional=True,
    ),
    # GLM blank infilling (bico.abi): adds [MASK]/[START]/[END] and records bico_objective="abi".
    "abi": Objective(
        lambda tokenizer, config: AbiCollator(tokenizer, seed=config.seed),
        bidirectional=True,
        setup=lambda model, tokenizer, config: prepare_abi_model(model, tokenizer),
    ),
}


# --------------------------------------------------------------------------------------------------
# Command line and YAML
# --------------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind: type) -> Callable[[str], object]:
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per `TrainConfig` field, plus `--config file.yaml`."""
    parser = argparse.ArgumentParser(
        description="BICO fine-tuning (arXiv 2311.07468). With no arguments: a small BICO run on data/.",
        argument_default=argparse.SUPPRESS,  # only flags actually given reach the namespace
    )
    parser.add_argument("--config", help="YAML file of TrainConfig fields; flags on the command line win")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        args = typing.get_args(hints[f.name])
        optional = type(None) in args  # `X | None`: the flag also takes "none"
        kind = next(kind for kind in args if kind is not type(None)) if optional else hints[f.name]
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=_optional(kind) if optional else kind, help=help_text)
    return parser


def load_yaml_config(path: str | os.PathLike) -> dict:
    """Read a YAML mapping of `TrainConfig` fields, refusing unknown keys."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(values).__name__}.")
    valid = [f.name for f in fields(TrainConfig)]
    for key in values:
        if key not in valid:
            raise ValueError(f"{path}: unknown field `{key}`; valid fields: {', '.join(valid)}.")
    return values


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Build a `TrainConfig` from defaults, then `--config file.yaml`, then the flags given."""
    given = vars(build_parser().parse_args(argv))
    values = load_yaml_config(given.pop("config")) if "config" in given else {}
    values.update(given)
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint `output_dir/checkpoints/step_N` with the largest N, or None."""
    complete = []
    for path in (Path(output_dir) / "checkpoints").glob("step_*"):
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match and (path / TRAINER_STATE).is_file():
            complete.append((int(match.group(1)), path))
    return max(complete)[1] if complete else None


def _fsync_tree(directory: Path) -> None:
    # Flush file contents and directory entries, so the rename below publishes finished files.
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, progress: dict, total_limit: int | None) -> Path:
    """`save_state` into `checkpoints/step_N.tmp`, then rename it to `checkpoints/step_N` (atomic).

    A kill at any moment leaves either no `step_N` or a complete one: `trainer_state.json` is written
    last and the rename happens after everything is on disk. Older checkpoints beyond `total_limit`
    are renamed away before they are deleted, so a half-deleted one never looks complete.
    """
    checkpoints = output_dir / "checkpoints"
    final = checkpoints / f"step_{progress['global_step']}"
    staging = checkpoints / f"{final.name}.tmp"
    if accelerator.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / TRAINER_STATE).write_text(json.dumps(progress, indent=2))
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(checkpoints)
        if total_limit is not None:
            steps = sorted(int(m.group(1)) for p in checkpoints.iterdir() if (m := CHECKPOINT_PATTERN.fullmatch(p.name)))
            for step in steps[:-total_limit]:
                doomed = checkpoints / f"step_{step}.deleting"
                os.replace(checkpoints / f"step_{step}", doomed)
                shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return final


def _clean_partial_checkpoints(output_dir: Path) -> None:
    for path in (output_dir / "checkpoints").glob("step_*"):
        if path.is_dir() and (path.name.endswith((".tmp", ".deleting")) or not (path / TRAINER_STATE).exists()):
            shutil.rmtree(path)


# --------------------------------------------------------------------------------------------------
# Model, data, evaluation
# --------------------------------------------------------------------------------------------------


def _training_texts(config: TrainConfig) -> tuple[list[str], list[str]]:
    dataset = load_train(config.data_dir, config.train_file)
    if config.max_train_samples is not None:
        dataset = dataset.select(range(min(config.max_train_samples, len(dataset))))
    return dataset["prompt"], dataset["completion"]


def _model_dir(config: TrainConfig, accelerator: Accelerator, texts: list[str]) -> Path:
    """The model to fine-tune; builds the default scratch model (atomically) when none is given."""
    if config.model_name_or_path is not None:
        path = Path(config.model_name_or_path)
        if is_gguf(path):
            # Converted once into the cache (bico.pretrained); the other processes wait for it.
            if accelerator.is_main_process:
                resolve_model_path(path)
            accelerator.wait_for_everyone()
            return resolve_model_path(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"`model_name_or_path` {str(path)!r} is not a model directory (no config.json); pass a local "
                "directory written by save_pretrained or a .gguf file, or omit it to build the small scratch model."
            )
        return path
    from .scratch import build_scratch_model

    base = Path(config.output_dir) / "base"
    if accelerator.is_main_process and not (base / "config.json").is_file():
        staging = base.with_name("base.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        build_scratch_model(texts, staging, seed=config.seed)
        os.replace(staging, base)
    accelerator.wait_for_everyone()
    return base


def _load_model(config: TrainConfig, model_dir: Path):
    dtype = config.model_dtype if config.model_dtype == "auto" else getattr(torch, config.model_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    setup = OBJECTIVES[config.objective].setup
    if setup is not None:
        setup(model, tokenizer, config)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if config.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = config.lora_target_modules
        targets = targets if targets == "all-linear" else [name.strip() for name in targets.split(",")]
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    patch_llama(model)
    return model, tokenizer


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices (and embeddings), not norms and biases, as nanoGPT does.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _keep_examples(examples: list[dict]) -> list[dict]:
    # The objective is chosen per step, so collation happens in the loop, not in the DataLoader.
    return examples


def _evaluate(model, tokenizer, tasks: list[str], config: TrainConfig, accelerator: Accelerator, show_progress: bool):
    """The one place training calls the evaluation: greedy decoding and ranking on the causal model."""
    from .evaluation import evaluate

    return evaluate(
        model, tokenizer, tasks, data_dir=config.data_dir, batch_size=config.eval_batch_size,
        max_new_tokens=config.eval_max_new_tokens, accelerator=accelerator, show_progress=show_progress,
    )


def _flat_metrics(results, prefix: str) -> dict[str, float]:
    """`{task: {metric: number}}` (nested dicts allowed) -> `{"prefix/task/metric": number}`."""
    flat = {}

    def visit(value, key):
        if isinstance(value, dict):
            for name, inner in value.items():
                visit(inner, f"{key}/{name}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)

    visit(results, prefix)
    return flat


def _tracker_config(config: TrainConfig) -> dict:
    # TensorBoard's hparams accept only numbers, strings and booleans.
    return {key: (value if isinstance(value, (int, float, str, bool)) else str(value)) for key, value in asdict(config).items()}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _cpu_threads(requested: int | None) -> int:
    """Threads for this process: `requested`, else OMP_NUM_THREADS unless it is 1, else cores / local processes.

    `accelerate launch` without a config file exports OMP_NUM_THREADS=1, which leaves a one-process CPU
    run on one core (measured: the default run takes 1.6x longer on 2 cores); a value above 1 was set
    on purpose and is kept.
    """
    if requested is not None:
        return requested
    from_env = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if from_env > 1:
        return from_env
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _check_sharding(accelerator: Accelerator) -> None:
    """Warn when `accelerate launch` asked for FSDP or DeepSpeed and Accelerate runs something else.

    Accelerate 1.15 uses neither on CPU (measured): with ACCELERATE_USE_CPU=1 it runs plain DDP over gloo
    (MULTI_CPU), so every process holds the whole model and optimizer state, and checkpoints are not sharded.
    """
    for flag, kind in (("ACCELERATE_USE_FSDP", DistributedType.FSDP), ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(flag, "false").lower() == "true" and accelerator.distributed_type != kind:
            logger.warning(
                f"`accelerate launch` asked for {kind.value} but Accelerate runs {accelerator.distributed_type.value} "
                "(it uses neither FSDP nor DeepSpeed on CPU): nothing is sharded."
            )


def _accelerate_version() -> tuple[int, int]:
    return tuple(int(part) for part in accelerate.__version__.split(".")[:2])


def train(config: TrainConfig) -> dict:
    """Fine-tune with `config.objective` mixed with NTP, save `output_dir/final`, evaluate.

    Args:
        config (`TrainConfig`): The run.

    Returns:
        `dict`: `global_step`; `loss` (mean training loss of the last step); `objectives` and
        `losses` (objective and mean loss of each step run in this call; `objectives` holds
        `[step, name]` pairs); `final_dir`; `eval_history` (evaluations during training);
        `results` (the final evaluation, or None).
    """
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The shuffling order of epoch e comes from seed + e, the same on every process and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    _check_sharding(accelerator)
    set_seed(config.seed)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(_cpu_threads(config.cpu_threads))
    stale = find_latest_checkpoint(output_dir) if config.resume_from_checkpoint is None else None
    if stale is not None:
        # Checkpoints of another run would mix with this run's (rotation keeps the highest steps).
        raise ValueError(
            f"`output_dir` {str(output_dir)!r} already holds checkpoints of a run ({stale.name}); pass "
            "`--resume_from_checkpoint latest` to continue it, or choose another `--output_dir`."
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _clean_partial_checkpoints(output_dir)
        (output_dir / "train_config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))

    # Data and model
    prompts, completions = _training_texts(config)
    model_dir = _model_dir(config, accelerator, [p + c for p, c in zip(prompts, completions)])
    model, tokenizer = _load_model(config, model_dir)
    examples, truncated = encode_rows(prompts, completions, tokenizer, config.max_length)
    if truncated:
        logger.warning(f"{truncated} of {len(examples)} training rows are longer than `max_length`={config.max_length} and were cut.")
    collators = {name: OBJECTIVES[name].make_collator(tokenizer, config) for name in dict.fromkeys(["ntp", config.objective])}
    dataloader = DataLoader(examples, batch_size=config.per_device_train_batch_size, shuffle=True, collate_fn=_keep_examples)

    optimizer = _optimizer(model, config)
    # len(dataloader) is still the single-process length here; prepare() shards it.
    processes = accelerator.num_processes
    batches_per_epoch = math.ceil(len(dataloader) / processes)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    if config.max_steps is not None:
        total_steps = config.max_steps
    elif config.num_train_epochs is not None:
        total_steps = math.ceil(config.num_train_epochs * steps_per_epoch)
    else:
        total_steps = DEFAULT_MAX_STEPS
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    scheduler_kwargs = {"min_lr_rate": config.min_lr_rate} if config.lr_scheduler_type.endswith("with_min_lr") else None
    # A prepared scheduler steps once per process at every optimizer step, hence the * processes.
    scheduler = get_scheduler(
        config.lr_scheduler_type, optimizer, num_warmup_steps=warmup * processes,
        num_training_steps=total_steps * processes, scheduler_specific_kwargs=scheduler_kwargs,
    )
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    if config.report_to:
        accelerator.init_trackers("bico", config=_tracker_config(config))

    # Resume
    global_step, epoch, batches_done = 0, 0, 0
    checkpoint = config.resume_from_checkpoint
    if checkpoint == "latest":
        checkpoint = find_latest_checkpoint(output_dir)
        if checkpoint is None:
            accelerator.print(f"no checkpoint in {output_dir / 'checkpoints'}; starting from step 0")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not (checkpoint / TRAINER_STATE).is_file():
            raise ValueError(f"`resume_from_checkpoint` {str(checkpoint)!r} is not a complete checkpoint (no {TRAINER_STATE}).")
        if accelerator.distributed_type == DistributedType.FSDP and _accelerate_version() < (1, 15):
            logger.warning(
                f"resuming an FSDP run with accelerate {accelerate.__version__}: bico's tests found the resumed run "
                "drifting from an uninterrupted one with accelerate < 1.15 (exact from 1.15 on); upgrade accelerate."
            )
        accelerator.load_state(checkpoint)
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        global_step, epoch, batches_done = state["global_step"], state["epoch"], state["batches_done"]
        changed = [key for key, value in state.get("config", {}).items()
                   if key not in RESUME_MAY_CHANGE and getattr(config, key, value) != value]
        if changed:
            logger.warning(f"resuming with other settings than the checkpoint's ({', '.join(changed)}): "
                           "the run will not repeat the original one.")
        if batches_done >= len(dataloader):
            epoch, batches_done = epoch + 1, 0
        accelerator.print(f"resumed from {checkpoint} at step {global_step}")
    history_file = output_dir / "eval_history.jsonl"
    eval_history = _read_history(history_file, global_step) if accelerator.is_main_process else []

    accelerator.print(
        f"training {total_steps} steps ({steps_per_epoch} per epoch), objective {config.objective}"
        f"{f' mixed with ntp at p_bico={config.p_bico}' if config.objective != 'ntp' else ''}, "
        f"{accelerator.num_processes} process(es) x batch {config.per_device_train_batch_size} "
        f"x accumulation {config.gradient_accumulation_steps}"
    )
    bar = tqdm(total=total_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process)
    objectives_run, losses, last_loss = [], [], float("nan")
    step_loss, micro_batches = torch.zeros((), device=accelerator.device), 0
    model.train()
    while global_step < total_steps:
        dataloader.set_epoch(epoch)
        batches = dataloader
        if batches_done:
            batches = skip_first_batches(dataloader, batches_done)
            # accelerate 1.8-1.14 start the new loader at epoch 0, i.e. with another data order (measured).
            batches.set_epoch(epoch)
        for raw in batches:
            batches_done += 1
            objective = config.objective if config.objective == "ntp" else choose_objective(
                config.seed, global_step, config.p_bico, config.objective
            )
            rows = [{**row, "seed": row_seed(config.seed, epoch, row["index"])} for row in raw]
            with accelerator.accumulate(model):
                batch = {key: value.to(accelerator.device) for key, value in collators[objective](rows).items()}
                # Normalise by the label count of the whole global batch, so that P processes x batch b
                # give the gradient of 1 process x batch P*b (DDP averages over processes).
                local_items = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
                global_items = accelerator.reduce(local_items, reduction="sum").clamp(min=1)
                mode = bidirectional(model) if OBJECTIVES[objective].bidirectional else contextlib.nullcontext()
                with mode:
                    loss = model(**batch, use_cache=False, num_items_in_batch=global_items / processes).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step_loss += loss.detach()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            last_loss = accelerator.reduce(step_loss / micro_batches, reduction="mean").item()
            step_loss.zero_()
            micro_batches = 0
            objectives_run.append([global_step, objective])
            losses.append(last_loss)
            global_step += 1
            bar.set_postfix(loss=f"{last_loss:.3f}", objective=objective, refresh=False)
            bar.update(1)
            if config.report_to and global_step % config.logging_steps == 0:
                accelerator.log(
                    {"train/loss": last_loss, f"train/loss_{objective}": last_loss,
                     "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch},
                    step=global_step,
                )
            if config.eval_every and global_step % config.eval_every == 0:
                results, _ = _evaluate(model, tokenizer, config.eval_every_task_list(), config, accelerator, False)
                record = {"step": global_step, "objective": config.objective, "tasks": results["tasks"]}
                eval_history.append(record)
                if accelerator.is_main_process:
                    with open(history_file, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                if config.report_to:
                    accelerator.log(_flat_metrics(results["tasks"], "eval"), step=global_step)
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                progress = {"global_step": global_step, "epoch": epoch, "batches_done": batches_done,
                            "config": asdict(config)}
                save_checkpoint(accelerator, output_dir, progress, config.checkpoints_total_limit)
            if global_step >= total_steps:
                break
        else:  # the epoch ran out before the steps did
            epoch, batches_done = epoch + 1, 0
    bar.close()

    # Final model: the plain causal model, adapters merged, objective recorded for bico-eval.
    final_dir = output_dir / "final"
    final_model = save_final_model(accelerator, model, tokenizer, config, model_dir, final_dir)

    results = None
    if config.eval_task_list():
        from .evaluation import format_table, write_predictions, write_results

        results, predictions = _evaluate(final_model, tokenizer, config.eval_task_list(), config, accelerator, True)
        results["model"] = str(final_dir)
        results["training"] = {"objective": config.objective, "p_bico": config.p_bico, "steps": global_step, "seed": config.seed}
        if accelerator.is_main_process:
            write_results(results, output_dir / "results.json")
            write_predictions(predictions, output_dir / "predictions.jsonl")
            print(format_table(results))
        if config.report_to:
            accelerator.log(_flat_metrics(results["tasks"], "final"), step=global_step)
    accelerator.end_training()
    return {
        "global_step": global_step,
        "loss": last_loss,
        "objectives": objectives_run,
        "losses": losses,
        "final_dir": str(final_dir),
        "eval_history": eval_history,
        "results": results,
    }


def save_final_model(accelerator: Accelerator, model, tokenizer, config: TrainConfig, model_dir: Path, final_dir: Path):
    """Save the trained model as a plain causal LM (LoRA merged, unpatched) with its tokenizer.

    `config.json` records `bico_objective`. Returns the saved model on every process, ready for
    evaluation; under FSDP, whose parameters are sharded, it is loaded back from `final_dir`.
    """
    accelerator.wait_for_everyone()
    if accelerator.distributed_type == DistributedType.FSDP:
        state_dict = accelerator.get_state_dict(model)  # gathered on the main process
        if accelerator.is_main_process:
            # Rebuild the model on the CPU as training built it (dtype, the objective's setup such as
            # abi's resized embeddings, peft around a fresh base), load the gathered weights, merge there.
            unsharded, _ = _load_model(config, model_dir)
            unsharded.load_state_dict(state_dict)
            if config.lora_r > 0:
                unsharded = unsharded.merge_and_unload()
            _write_final(unpatch_llama(unsharded), tokenizer, config, final_dir)
        accelerator.wait_for_everyone()
        return AutoModelForCausalLM.from_pretrained(final_dir).to(accelerator.device)
    final_model = accelerator.unwrap_model(model)
    if config.lora_r > 0:
        final_model = final_model.merge_and_unload()
    unpatch_llama(final_model)
    if accelerator.is_main_process:
        _write_final(final_model, tokenizer, config, final_dir)
    accelerator.wait_for_everyone()
    return final_model


def _write_final(model, tokenizer, config: TrainConfig, final_dir: Path) -> None:
    model.config.bico_objective = config.objective  # bico-eval picks the inference mode from it
    model.config.use_cache = True
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)


def _read_history(history_file: Path, up_to_step: int) -> list[dict]:
    """Evaluations recorded before a resume; drops those after the checkpoint (they are redone)."""
    if not history_file.is_file():
        return []
    records = [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()]
    records = [record for record in records if record["step"] <= up_to_step]
    history_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records
