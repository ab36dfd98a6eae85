"""Where a compiled train step's time goes: each XLA kernel's time from JAX's profiler trace, grouped
by phase (forward, backward, optimizer and the rest) and by kind (matmul, reduction, elementwise,
layout copy, collective), with the kernels that cost most.

The phase of a kernel comes from the JAX op names XLA keeps in the compiled program's metadata:
autodiff names the forward pass `jvp(…)` and the backward pass `transpose(jvp(…))`; the rest of
the step (gradient clipping, the optimizer update, metrics) is "optimizer". The kind comes from the
HLO ops inside the kernel (a fusion holding a dot is a matmul, one holding a reduce a reduction…).
Kernel times are what the profiler records for each XLA thunk; kernels may run side by side on the
CPU's threads, so their sum can exceed the step's wall time (the report gives both).

    python benchmarks/step_profile.py --recipe speedrun                     # the speedrun's step
    python benchmarks/step_profile.py --recipe speedrun --set model.qk_norm=false --json
    python benchmarks/step_profile.py --preset tiny --batch 12 --out docs/results/step_profile_tiny

It profiles the step the training loop compiles (`ParallelTrainer`, on the devices `jaxgpt train`
would use unless `--devices`; under pmap the kernel times add up over the devices), on a fixed random batch, after warm-up steps; the kernel table needs a JAX that writes the Chrome
trace (`*.trace.json.gz`) beside its XPlane profile, as JAX 0.4.30 and later do.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("forward", "backward", "optimizer")
KINDS = ("matmul", "reduction", "elementwise", "layout", "collective")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "slice", "concatenate", "pad", "broadcast", "parameter",
               "constant", "tuple", "get-tuple-element", "dynamic-slice", "dynamic-update-slice"}
_MATMUL_CALLS = ("__cublas$", "__cudnn$fmha", "__cudnn$flash", "__onednn$matmul")  # library kernels, by prefix
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


# --- reading the compiled program -------------------------------------------------------------

def parse_hlo(hlo_text: str) -> tuple[dict, dict]:
    """(instructions, computations) of an optimised HLO module's text: each instruction's opcode,
    shape, called computations and JAX op name; each computation's instruction names."""
    instructions: dict[str, dict] = {}
    computations: dict[str, list[str]] = {}
    current: Optional[str] = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            header = _COMPUTATION.match(line)
            current = header.group(1) if header and not line.startswith("HloModule") else None
            if current:
                computations[current] = []
            continue
        found = _INSTRUCTION.match(line)
        if not found or current is None:
            continue
        name, shape, opcode = found.groups()
        op_name = re.search(r'op_name="([^"]*)"', line)
        calls = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)
        operands = re.findall(r"%([\w.\-]+)", line[found.end():].split("),", 1)[0])
        target = re.search(r'custom_call_target="([^"]*)"', line)  # a library kernel (cuBLAS, cuDNN): its name
        opcode = target.group(1) if target else opcode
        instructions[name] = {"opcode": opcode, "shape": shape, "calls": calls, "operands": operands,
                              "op_name": op_name.group(1) if op_name else ""}
        computations[current].append(name)
    return instructions, computations


def _opcodes(name: str, instructions: dict, computations: dict, depth: int = 0) -> set[str]:
    """The opcodes an instruction runs: its own, and those of the computations it calls (fusions)."""
    inst = instructions[name]
    found = {inst["opcode"]}
    if depth < 4:
        for comp in inst["calls"]:
            for inner in computations.get(comp, []):
                found |= _opcodes(inner, instructions, computations, depth + 1)
    return found


def kernel_kind(name: str, instructions: dict, computations: dict) -> str:
    ops = _opcodes(name, instructions, computations)
    if ops & {"dot", "convolution"} or any(op.startswith(_MATMUL_CALLS) for op in ops):
        return "matmul"
    if any(op.startswith(_COLLECTIVES) for op in ops):
        return "collective"
    if ops & {"reduce", "reduce-window", "scatter", "sort"}:
        return "reduction"
    if ops - {"fusion"} <= _LAYOUT_OPS:
        return "layout"
    return "elementwise"


def kernel_op_name(name: str, instructions: dict, computations: dict, depth: int = 0) -> str:
    """The JAX op an instruction came from: its own metadata; else (a wrapped or fused op that lost
    it, or an op XLA added, such as the reduce-window of a tree reduction) the first full op path
    inside the computations it calls, then that of its operands."""
    inst = instructions[name]
    if "/" in inst["op_name"] or depth > 3:
        return inst["op_name"]
    inner = [i for comp in inst["calls"] for i in computations.get(comp, [])]
    for other in inner + [o for o in inst["operands"] if o in instructions]:
        found = kernel_op_name(other, instructions, computations, depth + 1)
        if "/" in found:
            return found
    return inst["op_name"]


def kernel_phase(op_name: str) -> str:
    if "transpose(jvp(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "optimizer"


# --- reading the trace ------------------------------------------------------------------------

def trace_kernel_times(trace_dir: Path, names: set[str]) -> tuple[collections.Counter, collections.Counter]:
    """(total µs, count) per kernel name over every complete event in the trace whose name is one
    of the compiled program's instructions."""
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit(f"the profiler wrote no *.trace.json.gz under {trace_dir}: this JAX keeps only the XPlane "
                         "profile; open it in TensorBoard or Perfetto instead")
    micros: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for path in files:
        for event in json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]:
            if event.get("ph") == "X" and event.get("name") in names:
                micros[event["name"]] += event.get("dur", 0)
                counts[event["name"]] += 1
    return micros, counts


# --- the profile ------------------------------------------------------------------------------

def build_step(model_cfg, train_cfg, devices: int, batch: int, seq_len: int):
    """(step(), compiled HLO text, FLOPs of one step) for the loop's compiled train step."""
    import jax
    import numpy as np

    from jaxgpt.nn.model import GPT, init_params
    from jaxgpt.train.metrics import compiled_flops
    from jaxgpt.train.step import ParallelTrainer, create_state, pmap_optimizer

    model, tx = GPT(model_cfg), pmap_optimizer(train_cfg, devices)  # as the loop builds it
    trainer = ParallelTrainer(model, tx, devices, 1)
    trainer.check_batch_size(batch)
    state = trainer.put_state(create_state(model, tx, init_params(model_cfg, 0), 0))
    rng = np.random.default_rng(0)
    x_bt, y_bt = (rng.integers(0, model_cfg.vocab_size, (batch, seq_len)).astype(np.int32) for _ in range(2))
    args = (state, trainer.split_batch(x_bt), trainer.split_batch(y_bt))
    hlo = trainer.step.lower(*args).compile().as_text()
    flops = compiled_flops(trainer.step, *args)

    def step():
        nonlocal state
        state, metrics = trainer(state, x_bt, y_bt)
        jax.block_until_ready(metrics["loss"])

    return step, hlo, (flops or 0.0) * devices


def profile(step, hlo_text: str, steps: int, warmup: int = 3) -> dict:
    """Time `steps` calls of `step` under JAX's profiler and group the kernels' time."""
    import jax

    for _ in range(warmup):
        step()
    walls = []
    for _ in range(steps):  # untraced: the wall time without the profiler's overhead
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    instructions, computations = parse_hlo(hlo_text)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                step()
        micros, counts = trace_kernel_times(Path(trace_dir), set(instructions))
    by_group: dict = collections.defaultdict(float)
    kernels = []
    for name, us in micros.items():
        inst, op_name = instructions[name], kernel_op_name(name, instructions, computations)
        phase, kind = kernel_phase(op_name), kernel_kind(name, instructions, computations)
        ms = us / 1e3 / steps
        by_group[(phase, kind)] += ms
        kernels.append({"kernel": name, "ms": ms, "calls_per_step": counts[name] / steps, "phase": phase,
                        "kind": kind, "shape": inst["shape"], "op": op_name})
    kernels.sort(key=lambda k: -k["ms"])
    by_op: dict = collections.defaultdict(float)  # every layer's copy of an op together: h_0/…, h_1/… -> h_*/…
    for k in kernels:
        by_op[(k["phase"], k["kind"], re.sub(r"\bh_\d+/", "h_*/", _op_path(k["op"])))] += k["ms"]
    ops = [{"phase": p, "kind": kind, "op": op, "ms": ms} for (p, kind, op), ms in by_op.items()]
    return {"wall_ms": 1e3 * statistics.median(walls), "kernel_ms": sum(k["ms"] for k in kernels),
            "kernels_per_step": sum(k["calls_per_step"] for k in kernels),
            "groups": {f"{p}/{k}": by_group.get((p, k), 0.0) for p in PHASES for k in KINDS},
            "top": kernels[:25], "ops": sorted(ops, key=lambda o: -o["ms"])[:25]}


def _op_path(op_name: str) -> str:
    """The op's path inside the model or optimizer, without the jit/jvp wrappers."""
    return re.sub(r"^jit\([^)]*\)/|(?:transpose\()?jvp\([^)]*\)\)?/", "", op_name)


def markdown(report: dict) -> str:
    groups, total = report["groups"], report["kernel_ms"] or 1.0
    lines = [f"{report['devices']} device(s), batch {report['batch']}: step wall {report['wall_ms']:.1f} ms (median, "
             f"untraced); kernel time {report['kernel_ms']:.1f} ms over {report['kernels_per_step']:.0f} kernels a step "
             f"(all devices); {report['gflop']:.2f} GFLOP a step "
             f"({report['gflop'] / report['wall_ms'] * 1e3:.0f} GFLOP/s)", "",
             "| phase | " + " | ".join(KINDS) + " | total | share |", "|---" * (len(KINDS) + 3) + "|"]
    for phase in PHASES:
        row = [groups[f"{phase}/{k}"] for k in KINDS]
        lines.append(f"| {phase} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {sum(row):.1f} | "
                     f"{100 * sum(row) / total:.0f} % |")
    lines += ["", "| JAX op (all layers) | phase | kind | ms |", "|---|---|---|---|"]
    lines += [f"| {o['op'] or '(no op name)'} | {o['phase']} | {o['kind']} | {o['ms']:.1f} |" for o in report["ops"][:15]]
    lines += ["", "| kernel | ms | phase | kind | shape | JAX op |", "|---|---|---|---|---|---|"]
    for k in report["top"][:8]:
        lines.append(f"| {k['kernel']} | {k['ms']:.2f} | {k['phase']} | {k['kind']} | `{k['shape']}` | {_op_path(k['op'])} |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=None, help="a training recipe (jaxgpt.train.recipes); default: speedrun")
    parser.add_argument("--preset", default=None, help="a model preset instead of the recipe's")
    parser.add_argument("--set", action="append", default=[], help="section.field=value, as `jaxgpt train --set`")
    parser.add_argument("--batch", type=int, default=None, help="sequences a step (default: the recipe's)")
    parser.add_argument("--vocab", type=int, default=65, help="vocabulary size (65: tinyshakespeare's characters)")
    parser.add_argument("--devices", type=int, default=None,
                        help="local devices (pmap); default: what `jaxgpt train` would use (one per core for small models)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    from jaxgpt.host_setup import one_cpu_device_per_core

    one_cpu_device_per_core()  # as `jaxgpt train` does, before JAX starts
    from jaxgpt.config import get_preset
    from jaxgpt.train.loop import default_device_count
    from jaxgpt.train.config import apply_overrides
    from jaxgpt.train.recipes import recipe_configs

    model_cfg, train_cfg = recipe_configs(args.recipe or "speedrun")
    if args.preset:
        model_cfg = get_preset(args.preset)
    model_cfg = model_cfg.replace(vocab_size=args.vocab)
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, args.set)
    batch = args.batch or train_cfg.batch_size
    seq_len = train_cfg.context_length or model_cfg.context_length
    devices = args.devices or default_device_count(train_cfg.replace(batch_size=batch), model_cfg)
    step, hlo, flops = build_step(model_cfg, train_cfg, devices, batch, seq_len)
    report = {"recipe": args.recipe or "speedrun", "preset": args.preset, "overrides": args.set, "batch": batch,
              "seq_len": seq_len, "devices": devices, "steps": args.steps, "gflop": flops / 1e9,
              **profile(step, hlo, args.steps)}
    text = markdown(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(text + "\n")
    print(json.dumps(report) if args.json else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
