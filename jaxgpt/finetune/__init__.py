"""Finetuning: the shared loop (loop: trainable masks, optimizer from jaxgpt.train, epochs, checkpoints),
classification (classify), instruction tuning (instruct), prompting baselines (prompting), LoRA (lora).
"""
