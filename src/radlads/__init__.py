"""radlads: convert softmax-attention decoders into RWKV-style linear-attention decoders (RADLADS)."""

__version__ = "0.1.0"
