"""The market's RPCs (Publish, Grant, Listings, Usage, Report, Audit) and its Prometheus counters.

Translation only: requests are parsed like every other call (bad bytes: INVALID_ARGUMENT), the
work is ``kvstore.market.Market``'s, errors map to statuses in ``servicer.instrumented``.
"""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge

from kvproto.pb import kvcache_pb2 as pb

from .market import MAX_TENANT_LABELS, Market
from .meter import COUNTERS
from .servicer import parse


def market_methods(servicer, market: Market, wrap) -> dict[str, grpc.RpcMethodHandler]:
    ser = lambda msg: msg.SerializeToString()  # noqa: E731
    calls = {
        "Publish": (pb.PublishRequest, market.publish),
        "Grant": (pb.GrantRequest, market.grant),
        "Listings": (pb.ListingsRequest, market.list),
        "Usage": (pb.UsageRequest, market.usage),
        "Report": (pb.ReportRequest, market.report),
        "Audit": (pb.AuditRequest, market.audit),
        "Withdraw": (pb.WithdrawRequest, market.withdraw),
    }

    def handler(cls, fn):
        def call(raw: bytes, context: grpc.ServicerContext):
            prefix = servicer._prefix(context)  # authenticates first: no parsing for strangers
            return fn(parse(cls, raw), prefix)
        return call

    return {name: grpc.unary_unary_rpc_method_handler(wrap(name, handler(cls, fn)), response_serializer=ser)
            for name, (cls, fn) in calls.items()}


def watch_market(metrics, market: Market) -> None:
    """Per-tenant counters, labelled by tenant for the first 64 tenants (sorted), "other" past
    that: the label set is bounded by the tokens file, never by what callers send."""
    r = metrics.registry
    named = sorted({t for t in market.tenants.values()})[:MAX_TENANT_LABELS]
    label = {t: (t or "none") for t in named}
    counters = {name: Counter(f"kvstore_tenant_{name}", f"Market meter: {name.replace('_', ' ')}", ["tenant"],
                              registry=r) for name in COUNTERS}
    for (tenant, name), value in market.totals.items():  # restored from LMDB: counters survive a restart
        if name in counters and value:
            counters[name].labels(label.get(tenant, "other")).inc(value)

    def count(tenant: str, name: str, amount: int) -> None:
        if name in counters:
            counters[name].labels(label.get(tenant, "other")).inc(amount)

    market.on_count = count
    ratio = Gauge("kvstore_tenant_token_hit_ratio", "Cached prompt tokens / prompt tokens (client reports)",
                  ["tenant"], registry=r)
    for tenant in named:
        ratio.labels(label[tenant]).set_function(lambda t=tenant: _ratio(market, t))


def _ratio(market: Market, tenant: str) -> float:
    prompt = market.totals.get((tenant, "prompt_tokens"), 0)
    return market.totals.get((tenant, "cached_tokens"), 0) / prompt if prompt else 0.0
