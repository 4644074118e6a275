"""Attention benchmark: one physics block, forward+backward, physics bias paths vs plain attention.

CPU (always): block dims `reference` (embed 768, 8 heads: the reference preset) and `small` (embed 64,
4 heads), N = 2048 and 8192 tokens, batch 1; cases
  plain       F.scaled_dot_product_attention without bias (fused kernel)
  sdpa_cK     the model's sdpa backend, bias built per query chunk of K rows (fused flash forward with
              the bias rows as mask, tiled backward from the saved logsumexp; model/attention.py)
  naive       the reference designs' way: full (N, N) bias passed as attn_mask, autograd through it
              (only where one (H, N, N) fp32 tensor fits in NAIVE_MAX_BYTES: it keeps several)
Times are medians of repeats after one warm-up, interleaved across cases (the machine is shared), as
wall seconds and as this process's CPU seconds (steadier when other jobs share the cores); peak
memory is measured in a fresh subprocess per case (ru_maxrss high-water mark minus the mark after
setup) so it belongs to that case alone, with glibc's mmap threshold fixed (see MALLOC_ENV).
GPU (when CUDA is available): flex vs sdpa vs plain at N = 8192 in bf16, reference dims, plus the max
abs difference of outputs and of alpha's gradient between flex and sdpa.
Goals (the model's default chunk): physics time <= 1.3x plain at reference dims and N = 8192,
bias-path peak extra memory <= 1.25x plain everywhere.
Writes benchmarks/results/attention.json.

    .venv/bin/python -m benchmarks.attention                              # the full run (quiet machine)
    .venv/bin/python -m benchmarks.attention --tokens 2048 --repeats 1    # a smoke run
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
from model.config import ModelConfig, PhysicsConfig
from model.net import Block
from model.physics import PhysicsBias, TokenFields

# glibc raises its mmap threshold after the first large free, after which freed (chunk x N) buffers
# stay in a fragmented heap and RSS reflects allocation history rather than live memory; a fixed
# threshold makes the peak figures measure what each path really holds (applied to every case).
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
DIMS = {"reference": (768, 8), "small": (64, 4)}  # (embed, heads)
REPEATS = {2048: 5, 8192: 3}  # timed repeats per token count (after one warm-up)
MODEL_CASE = f"sdpa_c{ModelConfig().chunk_size}"  # the model default
CASES = ("plain", *dict.fromkeys(("sdpa_c64", "sdpa_c256", MODEL_CASE)), "naive")  # model default included
NAIVE_MAX_BYTES = 2**30


class NaiveAttention(Attention):
    """Full N x N bias materialised and passed to SDPA with autograd (what the model avoids)."""

    def forward(self, x, fields):
        bsz, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(bsz, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.physics.rows(self.physics.operands(fields), 0, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bsz, n, dim))


def cases_for(dims: str, n: int, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """plain and the wanted cases, in CASES order; naive only where its (H, N, N) tensors fit."""
    heads = DIMS[dims][1]
    fits = {"naive": heads * n * n * 4 <= NAIVE_MAX_BYTES}
    return tuple(c for c in CASES if (c == "plain" or c in wanted) and fits.get(c, True))


def make_block(case: str, n: int, dims: str, device: str, dtype: torch.dtype):
    """One transformer block for `case`, its input and the per-token fields of a 1 x n patch strip."""
    torch.manual_seed(0)
    dim, heads = DIMS[dims]
    grid = (n // 128, 128)
    physics = None if case == "plain" else PhysicsBias(PhysicsConfig(), heads, 2.0, grid)  # model defaults
    if case == "naive":
        attn = NaiveAttention(dim, heads, physics)
    else:
        backend = "flex" if case == "flex" else "sdpa"
        chunk = int(case.split("_c")[1]) if "_c" in case else ModelConfig().chunk_size
        attn = Attention(dim, heads, physics, backend, chunk)
    block = Block(dim, 4.0, 0.0, attn).to(device=device, dtype=dtype)
    x = torch.randn(1, n, dim, device=device, dtype=dtype, requires_grad=True)
    idx = torch.arange(n, device=device)[None]
    fields = TokenFields(torch.rand(1, n, device=device) * 4000, torch.rand(1, n, device=device) * 12, idx // grid[1], idx % grid[1])
    return block, x, fields


def step(block, x, fields) -> tuple[float, float]:
    """One forward+backward; (wall seconds, this process's CPU seconds)."""
    x.grad = None
    block.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    block(x, fields).square().mean().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_memory(case: str, n: int, dims: str, threads: int) -> dict:
    """Peak RSS growth of one forward+backward; meant to run alone in a fresh process."""
    torch.set_num_threads(threads)
    block, x, fields = make_block(case, n, dims, "cpu", torch.float32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    step(block, x, fields)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_mib": (peak - base) / 1024, "peak_rss_mib": peak / 1024}


def memory_suite(runs: list[tuple[str, int]], wanted: tuple[str, ...], threads: int) -> dict:
    """Each case's peak memory in its own subprocess, spawned while this process is still small
    (Linux carries the parent's RSS high-water mark into the child)."""
    memory = {}
    for dims, n in runs:
        for case in cases_for(dims, n, wanted):
            cmd = [sys.executable, "-m", "benchmarks.attention", "--memory-case", case, "--n", str(n),
                   "--dims", dims, "--threads", str(threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=MALLOC_ENV).stdout
            memory[dims, n, case] = json.loads(out.strip().splitlines()[-1])
    return memory


def time_cases(dims: str, n: int, wanted: tuple[str, ...], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, cpu) seconds per repeat and case, interleaved case by case (A B C A B C ...) so load
    changes on the shared machine hit every case alike."""
    names = cases_for(dims, n, wanted)
    setups = {case: make_block(case, n, dims, "cpu", torch.float32) for case in names}
    for case in names:
        step(*setups[case])  # warm-up
    times: dict[str, list[tuple[float, float]]] = {case: [] for case in names}
    for _ in range(repeats):
        for case in names:
            times[case].append(step(*setups[case]))
    return times


def rows_for(dims: str, n: int, times: dict, memory: dict) -> list[dict]:
    """One result row per case with medians and the ratios to plain of the same dims and tokens."""
    embed, heads = DIMS[dims]
    rows = []
    for case, runs in times.items():
        rows.append({"dims": dims, "embed": embed, "heads": heads, "case": case, "n": n,
                     "time_s": statistics.median(w for w, _ in runs), "cpu_s": statistics.median(c for _, c in runs),
                     "times_s": [w for w, _ in runs], **memory[dims, n, case]})
    plain = next(r for r in rows if r["case"] == "plain")
    for row in rows:
        row["time_vs_plain"] = row["time_s"] / plain["time_s"]
        row["cpu_vs_plain"] = row["cpu_s"] / plain["cpu_s"]
        row["peak_vs_plain"] = row["peak_extra_mib"] / max(plain["peak_extra_mib"], 1e-9)
        row["rss_vs_plain"] = row["peak_rss_mib"] / plain["peak_rss_mib"]
    return rows


def cpu_suite(dims_list: list[str], tokens: list[int], wanted: tuple[str, ...], repeats: int | None, threads: int) -> list[dict]:
    """Memory first (subprocesses), then the interleaved timings, for every dims x tokens."""
    runs = [(dims, n) for dims in dims_list for n in tokens]
    memory = memory_suite(runs, wanted, threads)
    torch.set_num_threads(threads)
    rows = []
    for dims, n in runs:
        times = time_cases(dims, n, wanted, repeats or REPEATS.get(n, 3))
        for row in rows_for(dims, n, times, memory):
            rows.append(row)
            print(f"  {dims:9s} N={n:5d} {row['case']:10s} {row['time_s']:8.3f} s (cpu {row['cpu_s']:8.3f} s)  "
                  f"peak +{row['peak_extra_mib']:8.1f} MiB (RSS {row['peak_rss_mib']:.0f} MiB)", flush=True)
    return rows


def gpu_suite(n: int = 8192, repeats: int = 10) -> dict:
    """flex vs sdpa vs plain on CUDA in bf16, and flex-vs-sdpa agreement of outputs and alpha grads."""
    result = {"n": n, "dims": "reference", "dtype": "bfloat16", "device": torch.cuda.get_device_name()}
    grads = {}
    for case in ("plain", MODEL_CASE, "flex"):
        block, x, fields = make_block(case, n, "reference", "cuda", torch.bfloat16)
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
    result["max_abs_diff_out"] = (grads["flex"][0] - grads[MODEL_CASE][0]).abs().max().item()
    result["max_abs_diff_alpha_grad"] = (grads["flex"][1] - grads[MODEL_CASE][1]).abs().max().item()
    for case in (MODEL_CASE, "flex"):
        result[case]["time_vs_plain"] = result[case]["time_s"] / result["plain"]["time_s"]
    return result


def goals(rows: list[dict]) -> dict[str, bool | None]:
    """The goals on the model's default chunk; None where this run did not measure the case."""
    model = [r for r in rows if r["case"] == MODEL_CASE]
    target = [r for r in model if r["dims"] == "reference" and r["n"] == 8192]
    memory = {dims: [r for r in model if r["dims"] == dims] for dims in DIMS}
    return {
        "reference_8192_time_le_1.3x_plain": all(r["time_vs_plain"] <= 1.3 for r in target) if target else None,
        **{f"{dims}_peak_extra_le_1.25x_plain": all(r["peak_vs_plain"] <= 1.25 for r in rows) if rows else None
           for dims, rows in memory.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-case", choices=CASES, help="(internal) measure one case's peak memory, print JSON")
    parser.add_argument("--n", type=int, help="(internal) tokens of --memory-case")
    parser.add_argument("--dims", choices=list(DIMS), nargs="+", default=list(DIMS), help="block dims to run")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(REPEATS), help="token counts (multiples of 128)")
    parser.add_argument("--cases", choices=CASES, nargs="+", default=list(CASES), help="cases to run (plain always runs)")
    parser.add_argument("--repeats", type=int, help=f"timed repeats per case (default {REPEATS}, 3 otherwise)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps ratios stable on a shared machine)")
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(peak_memory(args.memory_case, args.n, args.dims[0], args.threads)))
        return 0
    print(f"CPU, one block fwd+bwd, dims {args.dims} (embed, heads) = {[DIMS[d] for d in args.dims]}, batch 1, "
          f"{args.threads} thread(s); model default {MODEL_CASE}")
    rows = cpu_suite(args.dims, args.tokens, tuple(args.cases), args.repeats, args.threads)
    print("ratios vs plain (time | cpu time | peak extra memory | peak RSS):")
    for row in rows:
        if row["case"] != "plain":
            print(f"  {row['dims']:9s} N={row['n']:5d} {row['case']:10s} time {row['time_vs_plain']:5.2f}x  "
                  f"cpu {row['cpu_vs_plain']:5.2f}x  extra mem {row['peak_vs_plain']:7.2f}x  RSS {row['rss_vs_plain']:5.2f}x")
    met = goals(rows)
    print(f"goals (model default: sdpa, {MODEL_CASE}):", met)
    if torch.cuda.is_available():
        gpu = gpu_suite()
        print("GPU:", json.dumps(gpu, indent=1))
    else:
        gpu = {"skipped": "no CUDA device: the flex vs sdpa vs plain bf16 comparison at N=8192 needs a GPU"}
        print("GPU part skipped: no CUDA device (flex vs sdpa vs plain, bf16, N=8192 runs when CUDA is available)")
    save_result("attention", {"cpu": rows, "threads": args.threads, "model_case": MODEL_CASE, "dims": DIMS,
                              "load_average": os.getloadavg(), "goals": met, "gpu": gpu, "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
