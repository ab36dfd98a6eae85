"""Pretraining: the train config (config), optimizer, the pure step (step), sharding over meshes
(sharding), the loop (loop), its data (batches), run directories and resume checks (run_dir),
metrics and plots (metrics), and `jaxgpt eval` (evaluate).
"""
