"""The model and its layers (the book's chapters 3 and 4): Flax Linen modules over plain parameter trees.

model (GPT, init_params, cross_entropy), blocks (Block, MLP, the scanned/rematerialised blocks),
attention (the multi-head layer and the backend registry), attention_backends (masks, naive, xla and
cached-query kernels), blockwise (tiled online-softmax backend), attention_book (the book's step-by-step
classes), latent_attention, linear_attention, positions (RoPE, ALiBi), dense (the dense layer and
mixed precision), layout (stacking the blocks for scan). Imports nothing above it but the top modules.
"""
