"""A pure-NumPy float64 reference of every layer: forward, hand-written backward, and AdamW.

In the style of picoGPT: one small function per operation, parameters as plain dicts, a shape
comment where shapes change. It takes the very same parameter pytree as `jaxgpt.nn.model.GPT`
(converted with `to_numpy`), so any JAX result can be checked against it.

Each forward function `f(x, …)` has its backward `f_backward(dout, x, …)` beside it: it takes the
upstream gradient and the forward's *inputs* (recomputing what it needs rather than caching), and
returns the gradients of the inputs and parameters. `gpt_loss_and_grads` chains them into the
gradient of the whole model; `adamw_step` is the optimizer step that `jaxgpt.train.optimizer`
builds in Optax. Dropout is not modelled: the reference is the deterministic pass.

Modules: `layers` (elementwise, norms, linear, embedding, MLPs), `moe` (mixture of experts), `attention` (the book's steps,
multi-head attention, variants, positions), `model` (block, whole model, loss, backward), `optim`.
"""

from jaxgpt.reference import attention_variants, gated_deltanet  # noqa: F401
from jaxgpt.reference.attention import (  # noqa: F401
    alibi_slopes, attention, attention_backward, attention_variant, attention_weights, causal_mask, latent_attention,
    linear_attention, llama3_inv_freq, mha, mha_backward, rope, rope_backward, simplified_self_attention,
)
from jaxgpt.reference.layers import (  # noqa: F401
    ACTIVATIONS, GELU_C, embedding, embedding_backward, gelu, gelu_backward, keep, layer_norm, layer_norm_backward, linear,
    linear_backward, mlp, mlp_backward, relu2, relu2_backward, rms_norm, rms_norm_backward, silu, silu_backward, softcap,
    softcap_backward, softmax, softmax_backward, to_numpy,
)
from jaxgpt.reference.model import (  # noqa: F401
    cross_entropy, cross_entropy_backward, gpt_forward, gpt_loss_and_grads, norm, transformer_block,
    transformer_block_backward,
)
from jaxgpt.reference.moe import moe, moe_backward  # noqa: F401
from jaxgpt.reference.dpo import (  # noqa: F401
    dpo_loss, dpo_loss_backward, sequence_logprob, sequence_logprob_backward,
)
from jaxgpt.reference.optim import adamw_init, adamw_step, decays, tree_leaves, tree_map  # noqa: F401
