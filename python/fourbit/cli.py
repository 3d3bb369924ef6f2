"""The `fourbit` command: `fourbit demo` (quantize and time a Llama-2-7B MLP block)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from . import ops
from .nn import quantize_


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|ref|^2 / |ref - out|^2)."""
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class MLPBlock(nn.Module):
    """The SwiGLU MLP of a Llama layer: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def demo(args) -> None:
    torch.manual_seed(args.seed)
    hidden, intermediate = 4096, 11008
    print(f"fourbit demo: a Llama-2-7B-shaped MLP block ({hidden} -> {intermediate} -> {hidden}, SwiGLU), "
          f"random fp32 weights (std 0.02), CPU, {torch.get_num_threads()} threads")
    block = MLPBlock(hidden, intermediate)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    float_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    xs = {m: torch.randn(m, hidden) for m in args.batch}
    refs = {m: block(x) for m, x in xs.items()}
    float_ms = {m: _median_ms(lambda x=x: block(x), args.runs) for m, x in xs.items()}

    start = time.perf_counter()
    quantize_(block, group_size=args.group_size, symmetric=args.symmetric)
    seconds = time.perf_counter() - start
    int4_bytes = sum(b.numel() * b.element_size() for b in block.buffers())
    print(f"quantized to int4 (group {args.group_size}, {'symmetric' if args.symmetric else 'asymmetric'}) "
          f"in {seconds:.1f} s: weights {float_bytes / 1e6:.1f} MB -> {int4_bytes / 1e6:.1f} MB "
          f"({float_bytes / int4_bytes:.1f}x smaller)")
    backend = ops.choose_backend(torch.device("cpu"), torch.float32, 1, intermediate, hidden)
    isa = f", {ops._C.int4_mm_cpu_isa()}" if backend == "cpu" else ""
    print(f"backend at M=1: {backend!r}{isa}; accuracy of the block output against fp32, and median "
          f"time over {args.runs} runs:")
    print(f"{'M':>5} {'SQNR dB':>8} {'rel err':>8} {'fp32 ms':>9} {'int4 ms':>9} {'speedup':>8}")
    with torch.inference_mode():
        for m, x in xs.items():
            out = block(x)
            rel = float((out - refs[m]).norm() / refs[m].norm())
            int4_ms = _median_ms(lambda x=x: block(x), args.runs)
            print(f"{m:>5} {_sqnr_db(refs[m], out):>8.1f} {rel:>8.4f} {float_ms[m]:>9.2f} {int4_ms:>9.2f} "
                  f"{float_ms[m] / int4_ms:>7.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fourbit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="quantize a synthetic Llama-2-7B MLP block; print accuracy and CPU speed")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="rows M to time")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    with torch.inference_mode():
        args.func(args)


if __name__ == "__main__":
    main()
