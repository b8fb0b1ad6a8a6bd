"""Model glue: fingerprint a model, turn its KV into stored blocks and back, generate token-exactly."""

from .blocks import KVLayout, PrefixPlan, plan_prefix
from .loader import load_prefix
from .fingerprint import fingerprint
from .generator import CachedGenerator, GenerationResult

__all__ = ["CachedGenerator", "GenerationResult", "KVLayout", "PrefixPlan", "fingerprint", "load_prefix", "plan_prefix"]
