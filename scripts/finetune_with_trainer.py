"""The default experiment of scripts/finetune_bico.py, run through `transformers.Trainer` with `bico.BicoTrainer`.

It checks that the Trainer adapter trains what the Accelerate loop trains: the same scratch model
(4.4M parameters, built from data/ with the run's seed), 1,500 steps of batch 32, AdamW at 1e-3 with
weight decay 0.1, cosine schedule to 10% after 5% warm-up, gradient clipping at 1, BICO or NTP per
step at p = 1/2 from (seed, step); then the five tasks are evaluated. The data order, the masks'
seeds and the AdamW parameter groups are the Trainer's own, so results agree within seed spread,
not bit for bit.

    python scripts/finetune_with_trainer.py --output_dir runs/trainer-bico            # BICO
    python scripts/finetune_with_trainer.py --p_bico 0 --output_dir runs/trainer-ntp  # NTP
    accelerate launch scripts/finetune_with_trainer.py ...                           # also multi-process

Checkpoints every 500 steps; re-running the same command resumes from the newest one.
"""

import argparse
from pathlib import Path

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from bico import BicoTrainer
from bico.collators import encode_rows
from bico.config import DEFAULT_MAX_STEPS
from bico.data import load_train
from bico.evaluation import evaluate, format_table, write_results
from bico.scratch import build_scratch_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/trainer-bico")
    parser.add_argument("--data_dir", default=None, help="name-description directory; default: the packaged data/")
    parser.add_argument("--p_bico", type=float, default=0.5, help="0 gives the NTP baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=DEFAULT_MAX_STEPS)
    options = parser.parse_args()
    output_dir = Path(options.output_dir)

    train = load_train(options.data_dir)
    base = output_dir / "base"
    if not (base / "config.json").is_file():
        build_scratch_model([p + c for p, c in zip(train["prompt"], train["completion"])], base, seed=options.seed)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    examples, _ = encode_rows(train["prompt"], train["completion"], tokenizer, max_length=256)
    dataset = datasets.Dataset.from_dict({"input_ids": [example["input_ids"] for example in examples]})

    args = TrainingArguments(
        str(output_dir), max_steps=options.max_steps, per_device_train_batch_size=32, learning_rate=1e-3,
        weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0.05, logging_steps=50, save_steps=500,
        save_total_limit=2, seed=options.seed, report_to="none",
    )
    trainer = BicoTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), p_bico=options.p_bico,
    )
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(output_dir)))
    trainer.save_model(str(output_dir / "final"))

    results, _ = evaluate(trainer.model, tokenizer, "all", data_dir=options.data_dir, accelerator=trainer.accelerator)
    results["training"] = {"trainer": "BicoTrainer", "p_bico": options.p_bico, "steps": trainer.state.global_step,
                           "seed": options.seed}
    if trainer.is_world_process_zero():
        write_results(results, output_dir / "results.json")
        print(format_table(results))


if __name__ == "__main__":
    main()
