"""Attention benchmark: one physics block, forward+backward, physics bias paths vs plain attention.

CPU (always): N = 2048 and 8192 tokens, embed 64, 4 heads, batch 1; cases
  plain       F.scaled_dot_product_attention without bias (fused kernel)
  sdpa_cK     the model's sdpa backend, bias built per query chunk of K rows
  naive       the reference designs' way: full (N, N) bias passed as attn_mask, autograd through it
Times are medians of repeats after one warm-up, interleaved across cases (the machine is shared);
peak memory is measured in a fresh subprocess per case (ru_maxrss high-water mark minus the mark
after setup) so it belongs to that case alone, with glibc's mmap threshold fixed (see MALLOC_ENV).
GPU (when CUDA is available): flex vs sdpa vs plain at N = 8192 in bf16, plus the max abs difference
of outputs and of alpha's gradient between flex and sdpa.
Goals: physics time <= 1.5x plain, bias-path peak memory <= 1.25x plain.
Writes benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import save_result
from model.attention import Attention
from model.config import PhysicsConfig
from model.net import Block
from model.physics import PhysicsBias, TokenFields

# glibc raises its mmap threshold after the first large free, after which freed (chunk x N) buffers
# stay in a fragmented heap and RSS reflects allocation history rather than live memory; a fixed
# threshold makes the peak figures measure what each path really holds (applied to every case).
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
DIM, HEADS = 64, 4
CPU_CASES = ("plain", "sdpa_c16", "sdpa_c64", "sdpa_c256", "naive")  # c64 = the model default chunk


class NaiveAttention(Attention):
    """Full N x N bias materialised and passed to SDPA with autograd (what the model avoids)."""

    def forward(self, x, fields):
        bsz, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(bsz, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.physics.rows(self.physics.operands(fields), 0, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bsz, n, dim))


def make_block(case: str, n: int, device: str, dtype: torch.dtype):
    """One transformer block for `case`, its input and the per-token fields of a 1 x n patch strip."""
    torch.manual_seed(0)
    grid = (n // 128, 128)
    physics = None if case == "plain" else PhysicsBias(PhysicsConfig(), HEADS, 2.0, grid)  # model defaults
    if case == "naive":
        attn = NaiveAttention(DIM, HEADS, physics)
    else:
        backend = "flex" if case == "flex" else "sdpa"
        chunk = int(case.split("_c")[1]) if "_c" in case else 64
        attn = Attention(DIM, HEADS, physics, backend, chunk)
    block = Block(DIM, 4.0, 0.0, attn).to(device=device, dtype=dtype)
    x = torch.randn(1, n, DIM, device=device, dtype=dtype, requires_grad=True)
    idx = torch.arange(n, device=device)[None]
    fields = TokenFields(torch.rand(1, n, device=device) * 4000, torch.rand(1, n, device=device) * 12, idx // grid[1], idx % grid[1])
    return block, x, fields


def step(block, x, fields) -> float:
    """One forward+backward; seconds."""
    x.grad = None
    block.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    block(x, fields).square().mean().backward()
    return time.perf_counter() - t0


def peak_memory(case: str, n: int, threads: int) -> dict:
    """Peak RSS growth of one forward+backward; meant to run alone in a fresh process."""
    torch.set_num_threads(threads)
    block, x, fields = make_block(case, n, "cpu", torch.float32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    step(block, x, fields)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_mib": (peak - base) / 1024, "peak_rss_mib": peak / 1024}


def cpu_suite(repeats: dict[int, int], threads: int) -> list[dict]:
    """Peak memory first (each case in a fresh subprocess, spawned while this process is still small:
    Linux carries the parent's RSS high-water mark into the child), then times interleaved case by
    case (A B C D A B C D ...) so load changes on the shared machine hit every case alike."""
    memory = {}
    for n in repeats:
        for case in CPU_CASES:
            cmd = [sys.executable, "-m", "benchmarks.attention", "--memory-case", case, "--n", str(n),
                   "--threads", str(threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=MALLOC_ENV).stdout
            memory[n, case] = json.loads(out.strip().splitlines()[-1])
    torch.set_num_threads(threads)
    rows = []
    for n, reps in repeats.items():
        setups = {case: make_block(case, n, "cpu", torch.float32) for case in CPU_CASES}
        for case in CPU_CASES:
            step(*setups[case])  # warm-up
        times: dict[str, list[float]] = {case: [] for case in CPU_CASES}
        for _ in range(reps):
            for case in CPU_CASES:
                times[case].append(step(*setups[case]))
        del setups
        for case in CPU_CASES:
            row = {"case": case, "n": n, "time_s": statistics.median(times[case]), "times_s": times[case], **memory[n, case]}
            rows.append(row)
            print(f"  N={n:5d} {case:10s} {row['time_s']:8.3f} s  peak +{row['peak_extra_mib']:8.1f} MiB (RSS {row['peak_rss_mib']:.0f} MiB)", flush=True)
    for row in rows:
        plain = next(r for r in rows if r["n"] == row["n"] and r["case"] == "plain")
        row["time_vs_plain"] = row["time_s"] / plain["time_s"]
        row["peak_vs_plain"] = row["peak_extra_mib"] / max(plain["peak_extra_mib"], 1e-9)
        row["rss_vs_plain"] = row["peak_rss_mib"] / plain["peak_rss_mib"]
    return rows


def gpu_suite(n: int = 8192, repeats: int = 10) -> dict:
    """flex vs sdpa vs plain on CUDA in bf16, and flex-vs-sdpa agreement of outputs and alpha grads."""
    result = {"n": n, "dtype": "bfloat16", "device": torch.cuda.get_device_name()}
    grads = {}
    for case in ("plain", "sdpa_c64", "flex"):
        block, x, fields = make_block(case, n, "cuda", torch.bfloat16)
        times = []
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats + 2):  # first calls compile flex
            x.grad = None
            block.zero_grad(set_to_none=True)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = block(x, fields)
            out.float().square().mean().backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        result[case] = {"time_s": statistics.median(times[2:]), "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        if case != "plain":
            grads[case] = (out.detach().float(), block.attn.physics.alpha.grad.float())
    result["max_abs_diff_out"] = (grads["flex"][0] - grads["sdpa_c64"][0]).abs().max().item()
    result["max_abs_diff_alpha_grad"] = (grads["flex"][1] - grads["sdpa_c64"][1]).abs().max().item()
    for case in ("sdpa_c64", "flex"):
        result[case]["time_vs_plain"] = result[case]["time_s"] / result["plain"]["time_s"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-case", choices=CPU_CASES, help="(internal) measure one case's peak memory, print JSON")
    parser.add_argument("--n", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps ratios stable on a shared machine)")
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(peak_memory(args.memory_case, args.n, args.threads)))
        return 0
    print(f"CPU, one block fwd+bwd, embed {DIM}, {HEADS} heads, batch 1, {args.threads} thread(s)")
    rows = cpu_suite({2048: 5, 8192: 3}, args.threads)
    print("ratios vs plain (time | peak extra memory | peak RSS):")
    for row in rows:
        if row["case"] != "plain":
            print(f"  N={row['n']:5d} {row['case']:10s} time {row['time_vs_plain']:6.2f}x  extra mem {row['peak_vs_plain']:7.2f}x  RSS {row['rss_vs_plain']:5.2f}x")
    model_rows = [r for r in rows if r["case"] == "sdpa_c64"]
    goals = {
        "time_le_1.5x_plain": all(r["time_vs_plain"] <= 1.5 for r in model_rows),
        "peak_extra_le_1.25x_plain": all(r["peak_vs_plain"] <= 1.25 for r in model_rows),
    }
    print("goals (model default: sdpa, chunk 64):", goals)
    if torch.cuda.is_available():
        gpu = gpu_suite()
        print("GPU:", json.dumps(gpu, indent=1))
    else:
        gpu = {"skipped": "no CUDA device: the flex vs sdpa vs plain bf16 comparison at N=8192 needs a GPU"}
        print("GPU part skipped: no CUDA device (flex vs sdpa vs plain, bf16, N=8192 runs when CUDA is available)")
    save_result("attention", {"cpu": rows, "threads": args.threads, "goals": goals, "gpu": gpu,
                              "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
