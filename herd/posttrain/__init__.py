"""Post-training: SFT, reward models, rejection sampling, DPO, LoRA/QLoRA, distillation, pruning."""
