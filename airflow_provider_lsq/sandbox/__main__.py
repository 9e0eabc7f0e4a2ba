"""Run a LeadSquared sandbox from the command line.

Prints the Airflow connection as one line of JSON on stdout (for scripts), a human hint on stderr, and
serves until SIGINT or SIGTERM. Example: ``python -m airflow_provider_lsq.sandbox --rate-limit 25/5``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from typing import Any

from airflow_provider_lsq.sandbox.server import Sandbox


def _rate_limit(text: str) -> tuple[int, float]:
    """Parse ``N/P`` (N calls per P seconds)."""
    try:
        calls, period = text.split("/", 1)
        parsed = int(calls), float(period)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected CALLS/SECONDS such as 25/5, not {text!r}") from exc
    if parsed[0] < 1 or parsed[1] <= 0:
        raise argparse.ArgumentTypeError("the rate limit needs at least 1 call in a positive period")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_lsq.sandbox", description="A local LeadSquared portal API."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    parser.add_argument(
        "--rate-limit",
        type=_rate_limit,
        default=(25, 5.0),
        metavar="N/P",
        help="the account's plan: N calls per moving window of P seconds; one more locks the account "
        "out for a window (default 25/5)",
    )
    parser.add_argument(
        "--bulk-rate-limit",
        type=_rate_limit,
        default=(5, 5.0),
        metavar="N/P",
        help="the bulk call's (Lead/Bulk/CreateOrUpdate) own, lower limit: N calls per P seconds "
        "(default 5/5)",
    )
    parser.add_argument(
        "--daily-limit", type=int, default=None, metavar="N", help="calls allowed per day (default: none)"
    )
    parser.add_argument(
        "--refusal-form",
        choices=["429", "403", "200", "cycle"],
        default="429",
        help="how a rate-limit refusal answers: HTTP 429, 403, or 200 with an error body; 'cycle' "
        "rotates through them (default 429)",
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, metavar="SECONDS", help="added to every answer (default 0)"
    )
    parser.add_argument(
        "--latency-jitter",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="random extra latency, up to this much (default 0)",
    )
    parser.add_argument(
        "--background-rate",
        type=float,
        default=0.0,
        metavar="CALLS_PER_SECOND",
        help="the account's other integrations: calls at random arrivals spending the same budget",
    )
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of calls answered by a gateway fault (502 or 503, with or without an HTML body) "
        "(default 0)",
    )
    parser.add_argument(
        "--lost-response-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of register calls carried out whose answer is then lost (a 502 from the gateway) "
        "(default 0)",
    )
    parser.add_argument("--access-key", default=None, help="the account's Access Key (default: random)")
    parser.add_argument("--secret-key", default=None, help="the account's Secret Key (default: random)")
    parser.add_argument("--portal-id", default="sandbox-portal", help="(default sandbox-portal)")
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed for faults and latency, for repeatable runs"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    calls, period = args.rate_limit
    try:
        sandbox = Sandbox(
            access_key=args.access_key,
            secret_key=args.secret_key,
            portal_id=args.portal_id,
            rate_limit_calls=calls,
            rate_limit_period=period,
            bulk_rate_limit_calls=args.bulk_rate_limit[0],
            bulk_rate_limit_period=args.bulk_rate_limit[1],
            daily_call_limit=args.daily_limit,
            refusal_form=args.refusal_form,
            latency=args.latency,
            latency_jitter=args.latency_jitter,
            background_rate=args.background_rate,
            fault_rate=args.fault_rate,
            lost_response_rate=args.lost_response_rate,
            seed=args.seed,
            host=args.host,
            port=args.port,
        ).start()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    connection = sandbox.connection_json()
    print(connection, flush=True)
    shown_period = int(period) if period.is_integer() else period
    print(
        f"LeadSquared sandbox on {sandbox.url} ({calls} calls / {shown_period} s); "
        f"export AIRFLOW_CONN_LEADSQUARED_DEFAULT={shlex.quote(connection)}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
