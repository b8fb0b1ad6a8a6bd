"""vLLM integration: ``KVStoreConnector`` (``inference.vllm.connector``) and an engine runner.

Importing this package does not import vLLM; ``kv_transfer_config`` builds the engine setting.
"""

from __future__ import annotations

from typing import Any

CONNECTOR = "KVStoreConnector"
MODULE = "inference.vllm.connector"


def kv_transfer_config(nodes: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``kv_transfer_config`` of an engine that loads and saves through the store."""
    if nodes is not None:
        extra["nodes"] = list(nodes)
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": MODULE, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}
