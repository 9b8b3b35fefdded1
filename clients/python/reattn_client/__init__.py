"""Python client for reattn, the ReAttention attention service.

    from reattn_client import Client
    c = Client("http://127.0.0.1:8080")
    ctx = c.create_context()["id"]
    r = c.step(ctx, layer=0, q=q, k=k, v=v)     # r.out [qlen, q_heads, head_dim]
    op = c.load(ctx, "kv.safetensors")          # a file under the server's --load-root
    c.wait_operation(op["id"], progress=True)
    c.snapshot(ctx, "before-upgrade")            # files under the server's --snapshot-dir
    new = c.restore("before-upgrade")["id"]     # a new context, on any number of ranks

`reattn_client.hf.attach(model, client, context_id)` runs a transformers model's attention
through the service (needs torch and transformers)."""

from .client import AttentionResult, Client, ReattnError, parse_metrics
from .operations import OperationError

__all__ = ["AttentionResult", "Client", "OperationError", "ReattnError", "parse_metrics"]
__version__ = "0.1.0"
