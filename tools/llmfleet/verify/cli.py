"""``python -m llmfleet.verify``: check a live vLLM endpoint against a plan's targets.

Exit 0: every target met; 2: a target missed or a regression against the last good run; 1: could
not measure (always one line on stderr, never a traceback). The API key is read from the
environment variable the plan instance's ``api_key_env`` (or ``--api-key-env``) names, or from the
file its ``api_key_file`` (or ``--api-key-file``) names, never from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import plot, report, runner, textfile
from .config import (
    LoadSpec,
    SweepSpec,
    Targets,
    VerifyConfig,
    config_from_instance,
    plan_instance,
    read_plan,
)
from .errors import ExitCode, VerifyError
from .httpclient import Timeouts

PROG = "verify"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would exit 2, which means "target missed" here
        raise VerifyError(f"usage: {message} (see --help)")


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not v > 0:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return v

    return parse


def _levels(text: str) -> tuple[int, ...]:
    parse = _positive(int)
    parts = [t.strip() for t in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected N or N,N,...: {text!r}")
    return tuple(int(parse(t)) for t in parts)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v < 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be >= 0 and < 1: {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Check a live vLLM OpenAI-compatible endpoint against a plan's targets.",
        epilog="exit codes: 0 all targets met, 2 a target missed or a regression, 1 could not measure",
    )
    src = p.add_argument_group("what to verify")
    src.add_argument(
        "--plan", metavar="FILE", help="a host's plan (schema 1) or tools/plan.py --json; its instance gives url, model, targets, load"
    )
    src.add_argument("-l", "--limit", metavar="HOST", help="the host of a tools/plan.py --json envelope (needed when it has several)")
    src.add_argument("--instance", metavar="NAME", help="instance of the plan (needed when it has several)")
    src.add_argument("--url", help="server URL, e.g. http://127.0.0.1:8000 (overrides the plan's)")
    src.add_argument("--model", help="served model id expected (default: the plan's, else the one served)")
    src.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key (sent as Bearer)")
    src.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="file holding the API key: VLLM_API_KEY=<key> or the bare key (default: the plan's api_key_file)",
    )

    tg = p.add_argument_group("targets (override the plan's)")
    tg.add_argument("--target-min-output-tokens-per-s", type=_positive(float), metavar="X")
    tg.add_argument("--target-max-ttft-p95-s", type=_positive(float), metavar="S")
    tg.add_argument("--target-min-context-tokens", type=_positive(int), metavar="N")
    tg.add_argument("--target-min-kv-cache-tokens", type=_positive(int), metavar="N")

    ld = p.add_argument_group("load (overrides the plan's)")
    ld.add_argument(
        "--concurrency",
        type=_levels,
        metavar="N[,N...]",
        help="concurrent streams (default 4); the targets are judged at the first level, the others are measured and reported",
    )
    ld.add_argument("--requests", type=_positive(int), metavar="N", help="requests at the target level (default 16; more at wider levels)")
    ld.add_argument("--prompt-tokens", type=_positive(int), metavar="N", help="prompt length in tokens (default 64)")
    ld.add_argument("--output-tokens", type=_positive(int), metavar="N", help="output length in tokens (default 32)")
    ld.add_argument(
        "--prompt-seed",
        type=_positive(int),
        metavar="N",
        help="seed of the first load prompt, to send the same prompts again (default: a random one per run, so that the "
        "server's prefix cache holds none of them; the JSON records it)",
    )

    ld.add_argument("--sweep", action="store_true", help="also sweep concurrency 1, 2, 4, ... until output tokens/s stops growing")
    ld.add_argument("--sweep-max-concurrency", type=_positive(int), default=64, metavar="N", help="largest sweep level (default 64)")
    ld.add_argument(
        "--sweep-min-gain",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="the sweep stops when a level adds less than this fraction of output tokens/s (default 0.1)",
    )
    ld.add_argument(
        "--no-ladder",
        action="store_true",
        help="skip the context ladder (longest answered prompt, refusals past the limit; about 2 × max_model_len tokens of prefill)",
    )
    ld.add_argument(
        "--shared-server",
        action="store_true",
        help="other clients may use the server: more server-counted tokens than the client's only warn",
    )

    hi = p.add_argument_group("against the last good run")
    hi.add_argument(
        "--history",
        metavar="DIR",
        help="earlier results (DIR/<generation>/<instance>.json); default with --plan: <plan root>/verify when it exists",
    )
    hi.add_argument("--no-history", action="store_true", help="compare with no earlier run")
    hi.add_argument(
        "--regression-tolerance",
        type=_fraction,
        default=None,
        metavar="F",
        help="output tokens/s or TPOT p50 worse than the last passing run's by more than this fraction fails"
        " (default: the plan target max_regression, else 0.2)",
    )

    to = p.add_argument_group("timeouts (seconds)")
    d = Timeouts()
    to.add_argument("--ready-timeout", type=float, default=120.0, metavar="S", help="wait this long for /health (default 120)")
    to.add_argument("--connect-timeout", type=_positive(float), default=d.connect, metavar="S", help=f"default {d.connect:g}")
    to.add_argument(
        "--first-byte-timeout",
        type=_positive(float),
        default=d.first_byte,
        metavar="S",
        help=f"request sent → first byte of the body, covers queueing and prefill (default {d.first_byte:g})",
    )
    to.add_argument("--idle-timeout", type=_positive(float), default=d.idle, metavar="S", help=f"silence mid-body (default {d.idle:g})")
    to.add_argument(
        "--request-timeout",
        type=_positive(float),
        metavar="S",
        help="cap on one whole request (default: first-byte timeout + 5 × idle timeout, 600 with the defaults)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help=f"print the JSON envelope ({report.SCHEMA}) instead of tables")
    out.add_argument("--output", metavar="FILE", help="also write the JSON envelope to FILE")
    out.add_argument("--textfile", metavar="FILE", help="also write a Prometheus textfile (node_exporter's textfile collector: *.prom)")
    out.add_argument("--plot", metavar="FILE", help="also write an HTML page of latency distributions, sweep and ladder")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--debug", action="store_true", help="print a traceback on an internal error")
    return p


def _default_history(plan: dict[str, Any]) -> str | None:
    """On a host, the role keeps results under <root>/verify/<generation>/: use them when they are there."""
    root = plan.get("root")
    if isinstance(root, str) and root:
        d = Path(root) / "verify"
        if d.is_dir():
            return str(d)
    return None


def config_from_args(args: argparse.Namespace) -> VerifyConfig:
    if args.ready_timeout != args.ready_timeout or args.ready_timeout < 0:
        raise VerifyError(f"usage: --ready-timeout must be >= 0, got {args.ready_timeout}")
    timeouts = Timeouts(args.connect_timeout, args.first_byte_timeout, args.idle_timeout, args.request_timeout)
    target_args = {
        k: getattr(args, f"target_{k}") for k in ("min_output_tokens_per_s", "max_ttft_p95_s", "min_context_tokens", "min_kv_cache_tokens")
    }
    levels: tuple[int, ...] = args.concurrency or ()
    load_args = {k: getattr(args, k) for k in ("requests", "prompt_tokens", "output_tokens")}
    load_args["concurrency"] = levels[0] if levels else None
    common: dict[str, Any] = {
        "timeouts": timeouts,
        "ready_timeout": args.ready_timeout,
        "extra_levels": levels[1:],
        "sweep": SweepSpec(args.sweep_max_concurrency, args.sweep_min_gain) if args.sweep else None,
        "ladder": not args.no_ladder,
        "shared_server": args.shared_server,
        "regression_tolerance": args.regression_tolerance,
        "prompt_seed": args.prompt_seed,
    }
    history = None if args.no_history else args.history
    if args.plan:
        plan = read_plan(args.plan, args.limit)
        inst = plan_instance(plan, args.instance, args.plan)
        generation = plan.get("generation")
        if history is None and not args.no_history:
            history = _default_history(plan)
        return config_from_instance(
            inst,
            target_overrides=target_args,
            load_overrides=load_args,
            plan=plan,
            url=args.url,
            model=args.model,
            api_key_env=args.api_key_env,
            api_key_file=args.api_key_file,
            generation=generation if isinstance(generation, str) else None,
            history_dir=history,
            **common,
        )
    if args.instance or args.limit:
        raise VerifyError(f"usage: {'--instance' if args.instance else '-l/--limit'} needs --plan")
    if not args.url:
        raise VerifyError("usage: give --plan FILE or --url URL (see --help)")
    return VerifyConfig(
        url=args.url,
        model=args.model,
        api_key_env=args.api_key_env,
        api_key_file=args.api_key_file,
        targets=Targets().merged(target_args),
        load=LoadSpec().merged(load_args),
        history_dir=history,
        **{k: v for k, v in common.items() if v is not None},
    )


def _error_envelope(reason: str) -> str:
    env = {
        "schema": report.SCHEMA,
        "ok": False,
        "exit_code": int(ExitCode.ERROR),
        "instance": None,
        "checks": [],
        "load": None,
        "server": {},
        "error": reason,
    }
    return json.dumps(env, indent=2) + "\n"


def _write(path: str | None, text: Callable[[], str]) -> None:
    if not path:
        return
    try:
        report.write_text(path, text())
    except OSError as exc:
        raise VerifyError(f"cannot write {path}: {exc.strerror or exc}") from None


def _say(reason: str) -> None:
    sys.stderr.write(f"{PROG}: {' '.join(reason.split())}\n")


def main(argv: Sequence[str] | None = None) -> int:
    want_json = "--json" in (sys.argv[1:] if argv is None else argv)
    debug = False
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        config = config_from_args(args)
        progress = report.progress_for(sys.stderr, enabled=not (args.json or args.no_progress))
        outcome = asyncio.run(runner.run(config, progress))
        _write(args.output, lambda: report.dumps(outcome))
        _write(args.textfile, lambda: textfile.render(outcome))
        _write(args.plot, lambda: plot.render(outcome))
        if args.json:
            sys.stdout.write(report.dumps(outcome))
        else:
            report.render_human(outcome)
        code = outcome.exit_code
        if code == ExitCode.ERROR:
            _say(outcome.error or "could not measure")
        elif code == ExitCode.TARGET_MISSED:
            missed = [c for c in outcome.checks if c.verdict == "fail"]
            _say("target missed: " + "; ".join(f"{c.name} {c.measured} {c.unit} (target {c.target})".replace("  ", " ") for c in missed))
        return int(code)
    except VerifyError as exc:
        reason = " ".join(str(exc).split())
        if want_json:
            sys.stdout.write(_error_envelope(reason))
        if args is not None and args.textfile:
            with contextlib.suppress(OSError):  # an alert on the exit code must see this run too
                report.write_text(args.textfile, textfile.render_error(args.instance or args.url or "unknown", reason))
        _say(str(exc))
        return int(ExitCode.ERROR)
    except KeyboardInterrupt:
        _say("interrupted")
        return int(ExitCode.ERROR)
    except Exception as exc:  # a bug: still one line unless asked
        if debug:
            traceback.print_exc()
        _say(f"internal error: {exc.__class__.__name__}: {exc}")
        return int(ExitCode.ERROR)
