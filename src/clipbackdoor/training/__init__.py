"""Training: contrastive CLIP training, pretraining, backdoor fine-tuning, data parallelism."""
