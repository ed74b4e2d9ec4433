"""The `nsa` command line."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_info(args) -> int:
    from nsa.machine import describe
    info = describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("python", "platform", "nsa", "torch", "triton", "cuda", "cuda_available"):
        print(f"{key:16} {info[key]}")
    if info["gpus"]:
        for gpu in info["gpus"]:
            details = ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in gpu.items() if k not in ("index", "name"))
            print(f"gpu {gpu['index']:<12} {gpu['name']} ({details})")
    else:
        print("gpu              none found (no NVIDIA GPU, driver or nvidia-ml-py)")
    print("flash attention implementations:")
    for label, version in info["flash_attention"].items():
        print(f"  {label:28} {version or 'not available'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention: tuned Triton kernels, "
                                     "correctness against a PyTorch reference, and reports against FlashAttention.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="describe this machine: GPU, torch/triton versions, FlashAttention variants",
                          description="Describe this machine: GPUs (through nvidia-ml-py), torch and triton "
                          "versions, and which FlashAttention implementations are importable.")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
