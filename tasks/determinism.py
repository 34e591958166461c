"""Reproducible numerics: the same inputs and seed give the same bits whatever intra-op thread
count the process has (a Ray worker with one CPU, a bench on a 16-core laptop).

Why the thread count matters (measured here: torch 2.13 CPU, MKL 2024.2, AVX-512; every aten
op of tiny training runs executed at 1 and at N threads on the same inputs): a few CPU
kernels split a reduction between threads, and float addition is not associative —
- MKL sgemm, so Linear forward and backward, for some row counts: 5 or 10 rows at 2 threads,
  33 at 4 (the rows are dealt to threads and the leftover rows take another micro-kernel);
  the last, partial batch of an epoch is such a matrix (two-tower and SASRec on `tiny`);
- LayerNorm backward: the weight and bias gradients are sums over rows, one partial sum per
  thread (SASRec);
- MKL's LAPACK SVD of a tall matrix (a 5000 x 64 table; factorize's low-rank embeddings), so
  `tasks.stages.factorize` decomposes on `THREADS` too.
The training ops differ by at most ~3e-6 relative, but Adam compounds it over an epoch into other weights,
and a main metric that moves in the 4th decimal. At a fixed thread count every kernel splits its
work the same way, and two runs are bit-identical (tests/unit/test_determinism.py: every
family, 1 and 2 process threads, twice each). DLRM happened to give the same bits at 1 and 2.

`THREADS` is 1: 2 threads do not reproduce 1 thread's bits (above), and Ray's default stage
slot has one CPU (`cpus_per_stage=1`, OMP_NUM_THREADS=1), so the flow already trained on one
thread; a fixed 2 would oversubscribe those slots and still differ from every earlier run.
The cost falls where a process has more threads (bench, notebooks, tests). Measured against
2 threads on this 2-core machine, DLRM (default spec): `tiny`, 3 epochs, 0.95-1.03 s vs
0.62-0.68 s; `small`, one epoch of 700k rows, median 29 s (17-31) vs 18 s (17-19): ~1.6x.

Bounds of the guarantee: bits are reproducible on one CPU kind and one torch/MKL build; another
instruction set (AVX2 vs AVX-512) or MKL version takes other kernels. On CUDA, `reproducible`
turns on torch's deterministic algorithms (embedding, index_put and index_add backward without
atomics); cuBLAS also needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before CUDA
starts (torch warns where it is missing). Every setting here is process-wide, so each context
restores what it found.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

THREADS = 1
"""Intra-op threads of training and inference whose bits must not depend on the process."""


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count is `n` inside, the previous one again afterwards (also on
    error). Usable as a decorator: `@fixed_threads(THREADS)`."""
    if n < 1:
        raise ValueError(f"fixed_threads: n must be >= 1 (got {n})")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch's deterministic algorithms inside (warn-only: an op that has none warns and runs),
    the previous setting afterwards. A caller's stricter setting is kept as it is."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if not enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@contextmanager
def reproducible(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Inside: `THREADS` intra-op threads, deterministic algorithms, and torch's global RNG
    (the CPU one, and `device`'s if it is a GPU) seeded with `seed`, for what draws from it
    (dropout). Afterwards all of these are as they were: the caller's RNG stream goes on as
    if nothing had drawn from it."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with fixed_threads(THREADS), deterministic_algorithms(), \
            torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for gpu in devices:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
        yield
