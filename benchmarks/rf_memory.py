"""Memory of the receptive-field program: XLA's buffer assignment, compiled for a batch and chunk size.

    python benchmarks/rf_memory.py --models vit_base_patch16_224,resnet50,vgg16 --batch_sizes 16,32 --chunk_sizes 4,8

Compiles `gradient_fields.make_rf_fn` (the experiment's default layers, f = 1/7) for abstract inputs, runs
nothing, and prints `compiled.memory_analysis()`: temporary buffers (activations, cotangents, workspace),
arguments (weights + images) and outputs, on the default jax backend. Compile time grows with the model
(ViT-B: about 15 s per row on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import itertools

import bench_common as bc

GIB = 2.0 ** 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_base_patch16_224,resnet50,vgg16")
    parser.add_argument("--batch_sizes", default="16,32")
    parser.add_argument("--chunk_sizes", default="4,8", help="0 = every layer's cotangent at once")
    parser.add_argument("--fraction", type=float, default=1.0 / 7.0)
    parser.add_argument("--json", default="", help="append one JSON record per row to this file")
    args = parser.parse_args()
    info = bc.start(with_torch=False)

    import jax
    import jax.numpy as jnp

    from vitsparse_jax.measures import gradient_fields as rf

    bc.print_table_head(["model (layers)", "batch", "chunk_size", "temporary GiB", "arguments GiB", "output GiB"])
    for name in args.models.split(","):
        module, variables = bc.flax_model(name.strip())
        minfo = module.info()
        img = minfo.img_size
        names = rf.select_layers(minfo, [])
        layers = tuple(rf.layer_specs(module, variables, minfo, names, args.fraction, (img, img)))
        abstract_vars = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
        for b, chunk in itertools.product(map(int, args.batch_sizes.split(",")),
                                          map(int, args.chunk_sizes.split(","))):
            fn = rf.make_rf_fn(module, layers, minfo.num_prefix_tokens, chunk)
            x = jax.ShapeDtypeStruct((b, img, img, 3), jnp.float32)
            w = jax.ShapeDtypeStruct((b,), jnp.float32)
            mem = fn.lower(abstract_vars, x, w).compile().memory_analysis()
            row = {"temp": mem.temp_size_in_bytes / GIB, "arguments": mem.argument_size_in_bytes / GIB,
                   "output": mem.output_size_in_bytes / GIB}
            print(bc.md_row([f"{name} ({len(layers)})", b, chunk, f"{row['temp']:.1f}", f"{row['arguments']:.2f}",
                             f"{row['output']:.3f}"]), flush=True)
            bc.append_json(args.json, bc.record("rf_memory", info, [], model=name, layers=len(layers),
                                                batch_size=b, chunk_size=chunk, gib=row))


if __name__ == "__main__":
    main()
