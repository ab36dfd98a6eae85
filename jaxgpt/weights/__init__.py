"""Weights on disk: Orbax checkpoints (checkpoint; inference reads parameters only) and the Hugging
Face GPT-2 layout in and out (hf). Knows nothing of optimizers or training.
"""
