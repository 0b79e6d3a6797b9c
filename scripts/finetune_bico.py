"""Fine-tune a Llama-family causal LM with BICO (arXiv 2311.07468), NTP, or another registered objective.

With no arguments: a complete small BICO experiment on the project's data (data/), with a small Llama
built from scratch, in under 10 minutes on 2 CPU cores, ending with the evaluation table:

    accelerate launch scripts/finetune_bico.py                      # 1 process (CPU or one GPU)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/finetune_bico.py   # 2 CPU processes (gloo)
    accelerate launch --config_file configs/accelerate_multi_gpu.yaml scripts/finetune_bico.py \\
        --model_name_or_path /models/Llama-2-7b-hf --lora_r 32 --learning_rate 2e-5 \\
        --lr_scheduler_type linear --warmup_steps 100 --per_device_train_batch_size 4 \\
        --num_train_epochs 10 --mixed_precision bf16 --data_dir ../shared/data/reversal_curse
    accelerate launch scripts/finetune_bico.py --config configs/train_llama2_lora.yaml   # flags from YAML
    accelerate launch scripts/finetune_bico.py --resume_from_checkpoint latest      # after a crash

Every flag is a field of `bico.config.TrainConfig`; `--help` lists them with their defaults. The same
command is installed as `bico-train` (and `accelerate launch -m bico.train`), for installs without the checkout.
"""

from bico.train import main

if __name__ == "__main__":
    main()
