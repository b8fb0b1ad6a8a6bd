"""kvctl's market commands: publish, grant, revoke, listings, usage, bill, audit (docs/market.md)."""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime, timezone

from kvproto.errors import FailedPrecondition

from .market import Market

COMMANDS = ("publish", "withdraw", "grant", "revoke", "listings", "usage", "bill", "audit")
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_commands(command) -> None:
    pub = command("publish", "publish a signed listing: a manifest file (kvproto.market) and your Ed25519 key")
    pub.add_argument("manifest", help="the manifest (canonical JSON)")
    pub.add_argument("--key", required=True, help="the publisher's Ed25519 private key (PEM)")
    pub.add_argument("--audit-rate", type=float, default=0.0,
                     help="recompute this share of the listing's full blocks (at least 1) before anyone may "
                          "load it: the listing stays 'pending audit' until the audit passes (needs --model)")
    _audit_flags(pub, model_required=False)
    wd = command("withdraw", "stop serving a listing of yours (its storage stops accruing; publish it again to relist)")
    wd.add_argument("listing")
    for name, what in (("grant", "let TENANT load LISTING"), ("revoke", "end TENANT's grant to LISTING")):
        sub = command(name, what)
        sub.add_argument("listing")
        sub.add_argument("tenant")
    lst = command("listings", "the listings you may read (JSON)")
    lst.add_argument("listing", nargs="?", default="")
    usage = command("usage", "metered usage per tenant and per listing (JSON)")
    usage.add_argument("--tenant", default="", help="whose (default: yours; '*' for all, admins only)")
    usage.add_argument("--since", default=None, help="ISO time, epoch seconds, or an age: 30m, 24h, 7d")
    usage.add_argument("--until", default=None, help="as --since (default: now)")
    bill = command("bill", "statements per tenant for a period, publishers' earnings (JSON)")
    bill.add_argument("--tariff", required=True, help="tariff JSON: {\"preset\": NAME, ...overrides}")
    bill.add_argument("--period", default=None, help="START..END (each as --since), default: everything")
    bill.add_argument("--tenant", default="*", help="whose usage to bill (default '*': all, admins only)")
    audit = command("audit", "recompute random blocks of a listing and compare; mark it failed if they differ, "
                             "passed if it was pending audit")
    audit.add_argument("listing")
    _audit_flags(audit, model_required=True)
    audit.add_argument("--blocks", type=int, default=None,
                       help="blocks to recompute (default: what the listing's pending audit asks, else 4)")
    audit.add_argument("--no-mark", action="store_true", help="report only, do not mark the listing")
    audit.add_argument("--clear", action="store_true",
                       help="a pass also clears a failed listing (market admins only)")


def _audit_flags(sub, model_required: bool) -> None:
    sub.add_argument("--model", required=model_required, default=None,
                     help="model name (inference.models) or directory, to recompute blocks")
    sub.add_argument("--dtype", default="float32")
    sub.add_argument("--seed", type=int, default=None)
    sub.add_argument("--atol", type=float, default=0.0, help="tolerance (0: bit for bit, same device and dtype)")


def parse_time(text: str | None, now: float | None = None) -> int:
    """Nanoseconds since the epoch of an ISO time, epoch seconds or an age ('24h'); 0 for None."""
    if text is None or text == "":
        return 0
    now = time.time() if now is None else now
    match = _RELATIVE.match(text.strip())
    if match:
        return int((now - float(match.group(1)) * _UNIT[match.group(2)]) * 1e9)
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"time {text!r}: use ISO 8601, epoch seconds or an age like 24h") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1e9)


def run(client, args: argparse.Namespace) -> int:
    market = Market(client)
    command = args.command
    if command == "publish":
        return _publish(client, market, args)
    elif command == "withdraw":
        when = market.withdraw(args.listing)
        print(f"withdrawn {args.listing} at {datetime.fromtimestamp(when / 1e9, timezone.utc).isoformat()}")
    elif command in ("grant", "revoke"):
        changed = market.grant(args.listing, args.tenant, revoke=command == "revoke")
        print(f"{command} {args.listing} {args.tenant}: {'done' if changed else 'no change'}")
    elif command == "listings":
        out = [{"listing": v.manifest.listing, "publisher": v.manifest.publisher, "tokens": v.manifest.tokens,
                "records": len(v.manifest.records), "fingerprint": v.manifest.fingerprint,
                "price_per_1k_loaded": v.manifest.price_per_1k_loaded, "visibility": v.manifest.visibility,
                "status": "withdrawn" if v.withdrawn_ns else v.status, "audit_blocks": v.audit_blocks,
                "grants": v.grants}
               for v in market.listings(args.listing)]
        print(json.dumps(out, indent=2))
    elif command == "usage":
        usage = market.usage(args.tenant, parse_time(args.since), parse_time(args.until))
        print(json.dumps({k: u.as_dict() for k, u in sorted(usage.items())}, indent=2))
    elif command == "bill":
        from .billing import bill, load_tariff

        tariff = load_tariff(args.tariff)  # a bad file fails before any call
        since, until = period(args.period)
        usage = market.usage(args.tenant, since, until)
        print(json.dumps(bill(usage, market.listings(), tariff), indent=2))
    elif command == "audit":
        return _audit(client, market, args)
    return 0


def period(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 0
    start, sep, end = text.partition("..")
    if not sep:
        raise ValueError(f"--period {text!r}: START..END (either side may be empty)")
    return parse_time(start), parse_time(end)


def _publish(client, market: Market, args) -> int:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from kvproto import market as mk

    if not 0 <= args.audit_rate <= 1:
        raise ValueError(f"--audit-rate must be between 0 and 1, got {args.audit_rate:g}")
    if args.audit_rate and not args.model:
        raise ValueError("--audit-rate needs --model: the audit recomputes blocks with it")
    with open(args.manifest, "rb") as f:
        manifest = f.read().strip()
    with open(args.key, "rb") as f:
        key = load_pem_private_key(f.read(), password=None)
    parsed = mk.parse_manifest(manifest)
    blocks = parsed.audit_blocks_at(args.audit_rate)
    checked = market.publish(manifest, key, audit_blocks=blocks)
    if not blocks:
        print(f"published: {checked} records checked by their nodes")
        return 0
    out = _recompute(client, args, parsed.listing, blocks)
    if not out["ok"]:
        out["status"] = market.mark(parsed.listing, failed=True, evidence=out["failed"][0])
        print(json.dumps(out, indent=2))
        return 3
    try:
        out["status"] = market.mark(parsed.listing, failed=False, blocks=len(out["blocks"]))
    except FailedPrecondition as exc:  # the node's own audit rate: an admin's audit clears it
        out["status"] = f"pending audit ({exc})"
    print(json.dumps({"published": checked, **out}, indent=2))
    return 0


def _recompute(client, args, listing: str, blocks: int) -> dict:
    """The recompute needs a model: it runs in `python -m inference.listings audit` (the client
    library never imports the model glue); the marking is this client's."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "inference.listings", "audit", listing, "--nodes", ",".join(client.ring.nodes),
           "--model", args.model, "--blocks", str(blocks), "--dtype", args.dtype, "--atol", str(args.atol)]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    env = dict(os.environ, KVCTL_AUDIT_TOKEN=args.token or "")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode not in (0, 3):
        raise ValueError(f"audit failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout)


def _audit(client, market: Market, args) -> int:
    views = market.listings(args.listing)
    if not views:
        raise ValueError(f"no listing {args.listing!r} you may read")
    view = views[0]
    if args.blocks is not None and args.blocks < 1:
        raise ValueError(f"--blocks must be at least 1, got {args.blocks}")
    out = _recompute(client, args, args.listing, args.blocks or view.audit_blocks or 4)
    if not args.no_mark:
        if not out["ok"]:
            out["status"] = market.mark(args.listing, failed=True, evidence=out["failed"][0])
        elif view.status != "ok" and (args.clear or not view.status.startswith("failed")):
            out["status"] = market.mark(args.listing, failed=False, blocks=len(out["blocks"]))
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 3
