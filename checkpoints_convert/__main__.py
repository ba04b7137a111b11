"""CLI: python -m checkpoints_convert --model ARCH[.TAG] --out DIR [--from-file PATH] [--num-classes N]."""
from __future__ import annotations

import argparse
import sys

from checkpoints_convert.convert import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=(
        "Convert timm weights to vitsparse_jax's safetensors + JSON format. Without --from-file the weights "
        "are downloaded from the Hugging Face hub (timm/<arch>.<tag>)."))
    parser.add_argument("--model", required=True, help="timm name with optional tag, e.g. "
                        "vit_base_patch16_224.augreg_in21k_ft_in1k (default tag when omitted)")
    parser.add_argument("--out", default="checkpoints", help="output folder (default: checkpoints/)")
    parser.add_argument("--from-file", default=None, help="local .safetensors/.pth/.bin instead of the hub; a "
                        "config.json next to it (hub snapshot) supplies the pretrained_cfg")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier size of the weights when the pretrained_cfg does not say (0 = headless)")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    args = parser.parse_args(argv)
    path = convert(args.model, args.out, from_file=args.from_file, num_classes=args.num_classes,
                   cache_dir=args.cache_dir)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
