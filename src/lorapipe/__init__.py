"""lorapipe: a reproducible LoRA / QLoRA fine-tuning pipeline on DVC."""
