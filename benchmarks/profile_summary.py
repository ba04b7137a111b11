"""Profile summary of one benchmarked program: where the time goes, in this project (XLA) and in the peer (torch).

    python benchmarks/profile_summary.py --program forward --model vit_base_patch16_224 --batch_size 8
    python benchmarks/profile_summary.py --program rf --model vit_base_patch16_224 --batch_size 1
    python benchmarks/profile_summary.py --program ablation --model vit_base_patch16_224 --batch_size 8

JAX side: `jax.profiler.trace` of `--iters` calls after warm-up; the trace (xplane) is read back with
`jax.profiler.ProfileData` and the duration of every executed XLA thunk is summed by HLO instruction. Each
instruction is classified from the optimised HLO (`compiled.as_text()`): what its fused computation contains
(dot = matmul, convolution, or elementwise/reduce only), and whether its op_name says it belongs to a
backward pass (`transpose(...)`). XLA's own cost analysis (flops, bytes accessed) of the compiled program
is printed beside it. Torch side: `torch.profiler` over the same number of calls, top ops by self CPU time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time

import bench_common as bc

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """(instruction name -> {opcode, calls, op_name}, computation name -> set of opcodes inside)."""
    instrs, comps, current = {}, collections.defaultdict(set), None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, _, opcode, rest = m.groups()
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        instrs[name] = {"opcode": opcode, "calls": calls.group(1) if calls else None,
                        "op_name": op_name.group(1) if op_name else ""}
        if current:
            comps[current].add(opcode)
    return instrs, comps


def classify(name: str, instrs: dict, comps: dict) -> str:
    ins = instrs.get(name)
    if ins is None:
        base = name.split(".")[0]
        ins = instrs.get(base, {"opcode": base, "calls": None, "op_name": ""})
    inside = set(comps.get(ins["calls"], ())) if ins["calls"] else {ins["opcode"]}
    if "convolution" in inside:
        kind = "convolution"
    elif "dot" in inside:
        kind = "matmul (dot)"
    elif ins["opcode"] in ("while", "conditional", "call"):
        kind = "control flow"
    elif inside & {"copy", "transpose"} and not inside - {"copy", "transpose", "parameter", "bitcast"}:
        kind = "copy / transpose"
    elif "reduce" in inside or "reduce-window" in inside:
        kind = "reduce (+ elementwise)"
    else:
        kind = "elementwise / other"
    if "transpose(" in ins.get("op_name", ""):
        kind += ", backward"
    return kind


def jax_profile(fn, args, iters: int, top: int) -> None:
    import jax

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    instrs, comps = parse_hlo(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax.block_until_ready(jitted(*args))
    tmp = tempfile.mkdtemp(prefix="vitsparse_trace_")
    wall = time.perf_counter()
    with jax.profiler.trace(tmp):
        for _ in range(iters):
            jax.block_until_ready(jitted(*args))
    wall = time.perf_counter() - wall
    path = sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    per_name: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python" or not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if ev.name.startswith(("ThreadpoolListener", "ThunkExecutor", "end: ")):
                    continue
                per_name[ev.name] += ev.duration_ns / 1e6
    total = sum(per_name.values()) or 1.0
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, ms in per_name.items():
        by_kind[classify(name, instrs, comps)] += ms
    print(f"\nJAX: {iters} call(s), {1e3 * wall / iters:.0f} ms wall per call; thunk time summed over threads "
          f"{total / iters:.0f} ms per call; trace {path}")
    if cost:
        print(f"XLA cost analysis: {cost.get('flops', 0) / 1e9:.1f} GFLOP, "
              f"{cost.get('bytes accessed', 0) / 2**30:.2f} GiB accessed per call "
              f"(XLA counts the body of a while loop once)")
    bc.print_table_head(["category", "ms per call", "share"])
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(bc.md_row([kind, f"{ms / iters:.1f}", f"{100 * ms / total:.1f}%"]))
    print()
    bc.print_table_head(["HLO instruction", "category", "jax op (op_name)", "ms per call", "share"])
    for name, ms in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]:
        ins = instrs.get(name, {})
        op = ins.get("op_name", "")
        op = op if len(op) < 90 else "..." + op[-87:]
        print(bc.md_row([name, classify(name, instrs, comps), f"`{op}`", f"{ms / iters:.1f}",
                         f"{100 * ms / total:.1f}%"]))


def torch_profile(fn, iters: int, top: int) -> None:
    import torch

    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    print(f"\ntorch: {iters} call(s); self CPU time {total / 1e3 / iters:.0f} ms per call (summed over threads)")
    bc.print_table_head(["torch op", "calls per call", "self ms per call", "share"])
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(bc.md_row([e.key, e.count // iters, f"{e.self_cpu_time_total / 1e3 / iters:.1f}",
                         f"{100 * e.self_cpu_time_total / total:.1f}%"]))


def build(args):
    """(jax fn, jax args, torch fn) of the requested program."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    device = bc.torch_device()
    model = bc.timm_model(args.model, device)
    module, variables = bc.flax_model(args.model, args.dtype, args.seed)
    shared = bc.shared_weights(model, module)
    variables = shared if shared is not None else variables
    info = module.info()
    b = args.batch_size
    images = bc.random_images(b, info.img_size, args.seed)
    x_np = bc.normalized_nhwc(images)
    x_jax = jax.device_put(x_np)
    x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)
    precision = bc.torch_precision(device, args.dtype)

    if args.program == "forward":
        def tfn():
            with torch.inference_mode(), precision:
                return model(x_torch)
        return jax.jit(lambda v, x: module.apply(v, x)[0]), (variables, x_jax), tfn
    if args.program == "attention":
        from attention_maps import attn_drop_modules

        bc.set_fused_attn(model, False)
        maps = []
        for m in attn_drop_modules(model):
            m.register_forward_hook(lambda mod, inp, out: maps.append(out))
        pattern = "layers.*.blocks.*.attn.probs" if info.family == "swin" else "blocks.*.attn.probs"

        def tfn():
            maps.clear()
            with torch.inference_mode(), precision:
                return model(x_torch)
        return jax.jit(lambda v, x: module.apply(v, x, capture=(pattern,))), (variables, x_jax), tfn
    if args.program == "ablation":
        from ablation_grid import Reference

        from vitsparse_jax.experiments.ablation import experiment as ablation
        from vitsparse_jax.experiments.ablation import units as ablation_units

        cfg = dict(info.default_cfg)
        plan = ablation_units.make_plan(module, ps=(0.05, 0.1, 0.2, 0.3), ns=(1, 2, 3), draws=3, whole_layer=False)
        ev = ablation.Evaluator(module, variables, plan, cfg, seed=args.seed)
        labels = np.zeros(b, np.int32)
        jargs = (ev.variables, jax.device_put(images), jax.device_put(labels),
                 jax.device_put(np.arange(b, dtype=np.int32)), ev.key)
        ref = Reference(model, plan, device, cfg["mean"], cfg["std"], seed=args.seed)
        t_images, t_labels = torch.from_numpy(images).to(device), torch.zeros(b, dtype=torch.long, device=device)

        def tfn():
            with precision:
                return ref.step(t_images, t_labels)
        return jax.jit(ev.step), jargs, tfn
    if args.program == "rf":
        from receptive_fields import torch_program

        from vitsparse_jax.measures import gradient_fields as rf

        names = rf.select_layers(info, [])
        layers = tuple(rf.layer_specs(module, variables, info, names, 1.0 / 7.0, (info.img_size, info.img_size)))
        fn = rf.make_rf_fn(module, layers, info.num_prefix_tokens, args.chunk_size)
        tp = torch_program(model, layers, info.num_prefix_tokens, device)
        return fn, (variables, x_jax, jnp.ones((b,), jnp.float32)), lambda: tp(x_torch)
    raise SystemExit(f"unknown --program {args.program!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", default="forward", choices=("forward", "attention", "ablation", "rf"))
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--chunk_size", type=int, default=8, help="rf: layers per vmapped chunk")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--torch", type=int, default=1, help="also profile the torch peer (1/0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bc.start(with_torch=False, extra=f"; load avg {bc.loadavg():.1f}")
    fn, jargs, tfn = build(args)
    jax_profile(fn, jargs, args.iters, args.top)
    if args.torch:
        torch_profile(tfn, args.iters, args.top)
    print(f"\nload avg after: {bc.loadavg():.1f}")


if __name__ == "__main__":
    main()
