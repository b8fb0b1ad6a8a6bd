"""Model glue: fingerprint a model, turn its KV into stored blocks and back, generate token-exactly."""

from .blocks import KVLayout, PrefixPlan, plan_prefix
from .loader import load_prefix
from .fingerprint import fingerprint
from .generator import CachedGenerator, GenerationResult
from .models import MODEL_NAMES, ModelUnavailable, encode_prompt, load_model

__all__ = [
    "MODEL_NAMES",
    "CachedGenerator",
    "GenerationResult",
    "KVLayout",
    "ModelUnavailable",
    "PrefixPlan",
    "encode_prompt",
    "fingerprint",
    "load_model",
    "load_prefix",
    "plan_prefix",
]
