"""Where an exported program's time goes: the default DLRM (untrained: numbers do not matter
for time), int8 rows + dynamic int8 Linear, its serving export profiled at batch 512 on one
thread next to the eager model and the fp32 baseline's program.

    .venv/bin/python docs/export_profile.py
"""

from __future__ import annotations

import time

import torch
from torch.profiler import profile

from tasks.data import to_arrays
from tasks.export import describe_inputs, example_inputs, serving_export
from tasks.generator import generate
from tasks.models import build, resolve
from tasks.stages import StageContext, apply_stage
from tasks.types import DlrmSpec, QuantizeConfig


def p50_ms(model: torch.nn.Module, args: tuple[torch.Tensor, ...], n: int = 50) -> float:
    with torch.no_grad():
        for _ in range(10):
            model(*args)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


def main() -> None:
    torch.set_num_threads(1)
    tables, data = generate("tiny", 0)
    spec = resolve(DlrmSpec(), data)
    valid = to_arrays(tables["valid"], data, spec.problem_kind(), spec.history_width())
    ctx = StageContext(calibration=lambda: valid, train_data=lambda: valid, spec=spec)
    baseline = build(spec, 0).eval()
    model = apply_stage(build(spec, 0).eval(), QuantizeConfig(), ctx).eval()
    program = serving_export(model, spec, data).program_module()
    base_program = serving_export(baseline, spec, data).program_module()
    args = example_inputs(describe_inputs(spec, data), 512, seed=1)
    print(f"p50 ms @512: eager int8 {p50_ms(model, args):.2f}, its program "
          f"{p50_ms(program, args):.2f}; eager fp32 {p50_ms(baseline, args):.2f}, its program "
          f"{p50_ms(base_program, args):.2f}")
    with torch.no_grad(), profile() as prof:
        for _ in range(20):
            program(*args)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
