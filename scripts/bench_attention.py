"""Benchmark bidirectional-RoPE attention: forward + backward time and peak memory.

Compares, in one run and on the same inputs (B=2, H=8, D=64, padding and placeholders in the key mask):
    reference      both L x L score matrices, tril + strict triu, one softmax (bico.attention)
    fused          two causal flash problems merged by log-sum-exp (bico.attention)
    sdpa-causal    torch SDPA, causal (what an NTP step pays)
    sdpa-full      torch SDPA, non-causal with the key mask (the same FLOPs as fused: the limit)

Each (method, L) runs in fresh subprocesses so peak memory is that method's own: on CUDA
`torch.cuda.max_memory_allocated` above the inputs; on CPU the peak resident set (VmHWM) above the
level after a warm-up step, measured in a second process started with `MALLOC_MMAP_THRESHOLD_=65536`
so glibc returns freed buffers at once (without it, memory freed by the warm-up is silently reused
and the peak is under-counted by a varying amount). Times come from the first process, unchanged.

    python scripts/bench_attention.py                       # CPU fp32, L in 512 2048 4096
    python scripts/bench_attention.py --device cuda         # bf16 on a GPU
    python scripts/bench_attention.py --lengths 512 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bico.attention import bico_attention, bico_attention_reference

METHODS = ("reference", "fused", "sdpa-causal", "sdpa-full")
B, H, H_KV, D = 2, 8, 8, 64


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(L: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    make = lambda heads: torch.randn(B, heads, L, D, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    q, q_conj = make(H), make(H)
    k, k_conj, v = make(H_KV), make(H_KV), make(H_KV)
    key_mask = torch.rand(B, L, generator=g) > 0.15  # placeholders
    key_mask[1, : L // 8] = False  # left padding in one row
    return q, k, v, q_conj, k_conj, key_mask.to(device)


def _step(method: str, q, k, v, q_conj, k_conj, key_mask):
    if method == "reference":
        out = bico_attention_reference(q, k, v, q_conj, k_conj, key_mask)
    elif method == "fused":
        out = bico_attention(q, k, v, q_conj, k_conj, key_mask)
    elif method == "sdpa-causal":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    out.sum().backward()


def worker(method: str, L: int, device: str, dtype: str, repeats: int) -> dict:
    """Time `repeats` steps of one method after a warm-up; report the best time and the peak memory."""
    dtype = getattr(torch, dtype)
    inputs = _inputs(L, device, dtype)
    _step(method, *inputs)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        base = _rss_kib("VmRSS:") * 1024
    times = []
    for _ in range(repeats):
        for t in inputs[:5]:
            t.grad = None
        start = time.perf_counter()
        _step(method, *inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM:") * 1024
    return {"method": method, "L": L, "seconds": min(times), "peak_mb": max(peak - base, 0) / 2**20}


def _run_worker(cmd: list[str], env: dict | None = None) -> dict | None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"{' '.join(cmd[3:5])} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.device, dtype, args.repeats)))
        return

    rows = []
    for L in args.lengths:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--worker", method, str(L), "--device", args.device, "--dtype", dtype]
            row = _run_worker(cmd + ["--repeats", str(args.repeats)])
            if row is None:
                continue
            if args.device == "cpu":
                memory = _run_worker(cmd + ["--repeats", "1"], env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
                row["peak_mb"] = memory["peak_mb"] if memory else float("nan")
            rows.append(row)
            print(f"  measured {method:12s} L={L:5d}: {rows[-1]['seconds']:.3f} s", file=sys.stderr)

    print(f"\nbidirectional-RoPE attention, forward + backward, B={B} H={H} D={D}, {args.device} {dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("| L | method | time (s) | peak mem (MB) | time / fused | mem / fused | time / sdpa-full |")
    print("|---|---|---|---|---|---|---|")
    by_key = {(r["method"], r["L"]): r for r in rows}
    for r in rows:
        fused, full = by_key.get(("fused", r["L"])), by_key.get(("sdpa-full", r["L"]))
        ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
        print(f"| {r['L']} | {r['method']} | {r['seconds']:.3f} | {r['peak_mb']:.0f} | "
              f"{ratio(r['seconds'], fused['seconds']) if fused else '-'} | "
              f"{ratio(r['peak_mb'], fused['peak_mb']) if fused else '-'} | "
              f"{ratio(r['seconds'], full['seconds']) if full else '-'} |")
    fused = {L: by_key[("fused", L)] for L in args.lengths if ("fused", L) in by_key}
    if len(fused) >= 2:
        Ls = sorted(fused)
        for a, b in zip(Ls, Ls[1:]):
            print(f"\nfused peak memory L={b} / L={a}: {fused[b]['peak_mb'] / max(fused[a]['peak_mb'], 1e-9):.2f}x "
                  f"(length ratio {b / a:.1f}x)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
