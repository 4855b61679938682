"""Where a decoder step's time goes inside the ExecuTorch runtime, from its own ETDump profile.

A timed step minus the lm_head timed alone overstates the rest of the step: alone, the head's
weights stay in the cache from one call to the next, inside the step they were evicted by the
block weights. The runtime's event tracer (ETDump, ``enable_etdump=True``) times every operator
and every XNNPACK operator inside a delegate where they really run, so the step splits into:

* block linears: our ``paretoq::*`` ops, and XNNPACK fully-connected ops other than the step's
  last one (8da4w, fp32);
* lm_head: the step's last XNNPACK fully-connected op (every variant of the decoder benchmark ends
  with its head on XNNPACK);
* attention: ``llama::custom_sdpa`` / ``update_cache`` (or nothing with plain attention);
* other: the rest of ``Method::execute`` (norms, rotary, activations, embedding, the runtime).

The profiled run is separate from the timed ones (the tracer adds a little time per event).
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from typing import Dict, List

import torch

FC_PREFIX = "Fully Connected"  # XNNPACK's name for its linear operators, e.g. "Fully Connected (NC, F32) GEMM #1"
PARTS = ("linears", "head", "attention", "other")


def _execute_events(etdump_path: str):
    """The events of the program's executions, in program order (one per call site, each holding
    the times of every execution)."""
    from executorch.devtools import Inspector

    blocks = [b for b in Inspector(etdump_path=etdump_path).event_blocks if b.name == "Execute"]
    if not blocks:
        raise RuntimeError(f"{etdump_path}: the ETDump holds no 'Execute' event block")
    return [e for e in blocks[0].events if e.perf_data is not None]


def split_events(events, skip: int) -> Dict[str, float]:
    """{part: mean ms per step} over the executions after the first ``skip``; ``events``: objects
    with ``name`` and ``perf_data.raw`` (ms per execution), in program order."""
    def mean(ev):
        raw = list(ev.perf_data.raw)[skip:]
        return sum(raw) / len(raw) if raw else 0.0

    fcs = [i for i, e in enumerate(events) if e.name.startswith(FC_PREFIX)]
    head_at = fcs[-1] if fcs else None
    out = defaultdict(float)
    for i, e in enumerate(events):
        if e.name == "Method::execute":
            out["step"] += mean(e)
        elif i == head_at:
            out["head"] += mean(e)
        elif e.name.startswith("paretoq::") or e.name.startswith(FC_PREFIX):
            out["linears"] += mean(e)
            out["linear_calls"] += 1
        elif e.name.startswith("llama::"):
            out["attention"] += mean(e)
    if out["step"] <= 0:
        raise RuntimeError("the ETDump holds no 'Method::execute' event")
    out["other"] = out["step"] - out["linears"] - out["head"] - out["attention"]
    return dict(out)


def profile_decoder(path: str, threads: int, prompt: List[int], steps: int, warmup: int = 4) -> Dict[str, float]:
    """Run the decoder program at ``path`` for ``warmup + steps`` one-token steps (the prompt's
    tokens, cycled) with ETDump on, and split its mean step time (ms) into ``PARTS`` (plus
    ``step`` and ``linear_calls`` per step)."""
    import paretoq_ao.export as pe
    from executorch.runtime import Runtime

    pe.set_num_threads(threads)
    pe.load_executorch(path)  # the kernel libraries this program needs, and its checks
    program = Runtime.get().load_program(path, enable_etdump=True)
    method = program.load_method("forward")
    for i in range(warmup + steps):
        method.execute([torch.tensor([[prompt[i % len(prompt)]]]), torch.tensor([i])])
    with tempfile.TemporaryDirectory(prefix="etdump-") as d:
        etdp = os.path.join(d, "run.etdp")
        program.write_etdump_result_to_file(etdp, os.path.join(d, "debug.bin"))
        return split_events(_execute_events(etdp), skip=warmup)
