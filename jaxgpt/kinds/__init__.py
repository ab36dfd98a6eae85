"""The built-in attention kinds, one module each, registered in `jaxgpt.registry.ATTENTION` when
this package is imported (the registry imports it on its first lookup). A kind defined outside the
package registers the same way from its own file (docs/extending.md)."""

from jaxgpt.kinds import gated_deltanet, latent, linear, softmax  # noqa: F401  (each registers itself)
