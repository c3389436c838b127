"""radlads: convert softmax-attention decoders into RWKV-style linear-attention decoders (RADLADS)."""

from .models import RadladsConfig, RadladsForCausalLM

__version__ = "0.1.0"
__all__ = ["RadladsConfig", "RadladsForCausalLM", "__version__"]
