"""Student architectures and their Hugging Face wrapper (registered with the Auto classes)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import RadladsCache
from .configuration import ARCHS, RadladsConfig
from .families import FAMILIES, UnsupportedTeacherError, family_of
from .modeling import RadladsForCausalLM, RadladsModel

AutoConfig.register(RadladsConfig.model_type, RadladsConfig, exist_ok=True)
AutoModel.register(RadladsConfig, RadladsModel, exist_ok=True)
AutoModelForCausalLM.register(RadladsConfig, RadladsForCausalLM, exist_ok=True)

__all__ = [
    "ARCHS",
    "FAMILIES",
    "RadladsCache",
    "RadladsConfig",
    "RadladsForCausalLM",
    "RadladsModel",
    "UnsupportedTeacherError",
    "family_of",
]
