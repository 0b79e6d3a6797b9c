"""Options of a training run: `TrainConfig`, its command line (one flag per field) and YAML files.

`scripts/finetune_bico.py` and `bico-train` build a `TrainConfig` with `parse_config`: the defaults,
then `--config file.yaml`, then the flags given on the command line. Every value is checked when the
config is built, so a bad option fails before any model is loaded. The command line and YAML helpers
take any such dataclass (`config_class`); `bico.axioms.training.AxiomConfig` uses them too.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import yaml
from transformers import SchedulerType

from .data import TRAIN_FILE, resolve_tasks
from .demask import DEFAULT_MARKER, DEFAULT_SEPARATOR
from .masking import SCHEDULES, check_schedule
from .objectives import OBJECTIVES


DEFAULT_MAX_STEPS = 1500  # the default run: ~5 min of training on 2 idle CPU cores, then ~1 min of evaluation
REVERSE_TASKS = "n2d-reverse,d2n-reverse"
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16", "fp8")
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")
# The options that make a variant of an objective ("bico:mask_prob=0.3"), per objective, in label order.
VARIANT_FIELDS = {
    "ntp": (),
    "bico": ("p_bico", "mask_prob", "mask_schedule", "mask_min", "mask_max", "entity_mask_prob"),
    "abi": ("p_bico",),
    "reverse": ("p_bico", "reverse_marker"),
    "demask": ("p_bico", "mask_prob", "mask_schedule", "mask_min", "mask_max", "entity_mask_prob", "demask_invert_prob"),
}
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
    objective: str = field(default="bico", metadata={"help": f"{', '.join(OBJECTIVES)}; any but ntp is mixed with NTP by p_bico"})
    p_bico: float = field(default=0.5, metadata={"help": "probability that a step uses `objective` rather than NTP"})
    mask_prob: float = field(default=0.15, metadata={"help": "BICO, demask: masking rate of the fixed and span schedules"})
    mask_schedule: str = field(default="fixed", metadata={"help": f"BICO, demask: {', '.join(SCHEDULES)} (bico.masking)"})
    mask_min: float = field(default=0.0, metadata={"help": "BICO, demask uniform schedule: lowest per-row rate"})
    mask_max: float = field(default=1.0, metadata={"help": "BICO, demask uniform schedule: highest per-row rate"})
    placeholder_id: int | None = field(default=None, metadata={"help": "BICO: id written over masked tokens; None = pad, else unk, else eos"})
    entity_mask_prob: float = field(default=0.0, metadata={
        "help": "BICO, demask: also mask each entity (capitalised run, answer name) whole with this probability (bico.entities); 0 = off"})
    reverse_marker: str = field(default="", metadata={
        "help": "reverse: text (existing tokens) written before each reversed row, e.g. '(reversed)'; empty = none, as in the paper"})
    demask_marker: str = field(default=DEFAULT_MARKER, metadata={"help": "demask: visible text of one existing token written over masked tokens"})
    demask_separator: str = field(default=DEFAULT_SEPARATOR, metadata={
        "help": "demask: text between the masked copy and the row, existing tokens (a newline by default; set control characters in YAML)"})
    demask_invert_prob: float = field(default=0.0, metadata={
        "help": "demask: probability per row that the copy shows the masked tokens and hides the rest (bico.demask); 0 = never"})

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
    eval_every: int = field(default=0, metadata={
        "help": "evaluate eval_every_tasks every N steps during training (at the last step only those not in eval_tasks); 0 = never"})
    eval_every_tasks: str = field(default=REVERSE_TASKS, metadata={"help": "tasks of the evaluations during training"})
    eval_batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    eval_max_new_tokens: int = field(default=40, metadata={"help": "greedy decoding length"})

    def __post_init__(self):
        check_choice("objective", self.objective, list(OBJECTIVES))
        check_choice("lr_scheduler_type", self.lr_scheduler_type, [s.value for s in SchedulerType])
        check_choice("model_dtype", self.model_dtype, DTYPE_CHOICES)
        if self.mixed_precision is not None:
            check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_CHOICES)
        if not 0.0 <= self.p_bico <= 1.0:
            raise ValueError(f"`p_bico` must be in [0, 1], got {self.p_bico}.")
        check_schedule(self.mask_schedule, self.mask_prob, self.mask_min, self.mask_max, self.entity_mask_prob)
        if not isinstance(self.reverse_marker, str) or self.reverse_marker != self.reverse_marker.strip():
            raise ValueError(f"`reverse_marker` must be text without surrounding spaces (a space follows it), got {self.reverse_marker!r}.")
        if not 0.0 <= self.demask_invert_prob <= 1.0:
            raise ValueError(f"`demask_invert_prob` must be in [0, 1] (0 never inverts the copy), got {self.demask_invert_prob}.")
        for name in ("demask_marker", "demask_separator"):  # the tokenizer checks the rest when the collator is built
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"`{name}` must be non-empty text, got {getattr(self, name)!r}.")
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


def check_choice(name: str, value, choices: Sequence) -> None:
    """Raise `ValueError` naming the field `name` and listing `choices` unless `value` is one of them."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(str, choices))}; got {value!r}.")


def _task_list(tasks: str) -> list[str]:
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    return [] if names in ([], ["none"]) else resolve_tasks(names)


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


def build_parser(config_class: type = TrainConfig, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per field of `config_class`, plus `--config file.yaml`.

    Args:
        config_class (`type`, *optional*, defaults to `TrainConfig`): A dataclass whose fields carry a
            `help` in their metadata.
        parser (`argparse.ArgumentParser`, *optional*): The parser to add the flags to (e.g. one whose
            errors are one line); a new one when None. Only flags actually given reach the namespace.
    """
    if parser is None:
        parser = argparse.ArgumentParser(
            description="BICO fine-tuning (arXiv 2311.07468). With no arguments: a small BICO run on data/."
            if config_class is TrainConfig else config_class.__doc__,
        )
    suppress = argparse.SUPPRESS  # only flags actually given reach the namespace
    parser.add_argument("--config", default=suppress, help=f"YAML file of {config_class.__name__} fields; flags on the command line win")
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        args = typing.get_args(hints[f.name])
        optional = type(None) in args  # `X | None`: the flag also takes "none"
        kind = next(kind for kind in args if kind is not type(None)) if optional else hints[f.name]
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=suppress, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=_optional(kind) if optional else kind, default=suppress, help=help_text)
    return parser


def load_yaml_config(path: str | os.PathLike, config_class: type = TrainConfig) -> dict:
    """Read a YAML mapping of `config_class` fields, refusing unknown keys."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    name = config_class.__name__
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of {name} fields, got {type(values).__name__}.")
    valid = [f.name for f in fields(config_class)]
    for key in values:
        if key not in valid:
            raise ValueError(f"{path}: unknown field `{key}`; valid fields: {', '.join(valid)}.")
    return values


def parse_config(argv: Sequence[str] | None = None, config_class: type = TrainConfig,
                 parser: argparse.ArgumentParser | None = None):
    """Build a `config_class` (default `TrainConfig`) from defaults, then `--config file.yaml`, then the flags given.

    `parser` is one `build_parser(config_class)` returned; a new one when None.
    """
    given = vars((parser or build_parser(config_class)).parse_args(argv))
    values = load_yaml_config(given.pop("config"), config_class) if "config" in given else {}
    values.update(given)
    return config_class(**values)
