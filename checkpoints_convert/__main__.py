"""CLI: python -m checkpoints_convert --model ARCH[.TAG] --out DIR [--from-file PATH] [--num-classes N]."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checkpoints_convert.convert import convert
from vitsparse_jax.runtime import errors
from vitsparse_jax.runtime.paths import expand_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=(
        "Convert timm weights to vitsparse_jax's safetensors + JSON format: a local .safetensors/.pth/.bin "
        "(training checkpoints, hub snapshots) with --from-file, else timm/<arch>.<tag> from the Hugging Face "
        "hub. Experiments need no conversion step for hub weights: --config.model=<arch>.<tag> fetches them."))
    parser.add_argument("--model", required=True, help="timm name with optional tag, e.g. "
                        "vit_base_patch16_224.augreg_in21k_ft_in1k (default tag when omitted)")
    parser.add_argument("--out", default="checkpoints", help="output folder (default: checkpoints/)")
    parser.add_argument("--from-file", default=None, help="local .safetensors/.pth/.bin instead of the hub; a "
                        "config.json next to it (hub snapshot) supplies the pretrained_cfg")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="0: drop the file's classifier (keep the pooled features, as timm's num_classes=0); "
                        "otherwise the classifier is the one the file holds (read from its tensors)")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--verbose", action="store_true", help="show the traceback of every error")
    args = parser.parse_args(argv)
    for name in ("out", "from_file", "cache_dir"):      # `~` and $VARS, also when the shell left them
        setattr(args, name, expand_path(getattr(args, name)))
    try:
        if args.from_file is not None and not Path(args.from_file).exists():
            raise FileNotFoundError(f"--from-file {args.from_file} does not exist; give the path of a timm "
                                    ".safetensors/.pth/.bin file")
        path = convert(args.model, args.out, from_file=args.from_file, num_classes=args.num_classes,
                       cache_dir=args.cache_dir)
    except Exception as e:  # noqa: BLE001  (user errors: one line, exit 2; --verbose: the traceback)
        if args.verbose or errors.verbose_requested():
            raise
        return _report(e, args, parser.prog)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def _report(e: Exception, args: argparse.Namespace, prog: str) -> int:
    """Prints what is wrong and what to do for a user error; re-raises an internal error."""
    library = type(e).__module__.split(".")[0]
    if library in ("huggingface_hub", "requests", "urllib3", "httpx"):
        text = (f"cannot download {args.model} from the Hugging Face hub ({type(e).__name__}: "
                f"{(errors.message(e).splitlines() or [''])[0]}). Check the name and the network, or convert a "
                "local file with --from-file")
    elif args.from_file is not None and not errors.is_user_error(e) and library in ("torch", "safetensors", "pickle",
                                                                                    "zipfile", "_pickle", "builtins"):
        detail = "" if "Unpickl" in type(e).__name__ else f": {(errors.message(e).splitlines() or [''])[0]}"
        text = (f"cannot read --from-file {args.from_file} ({type(e).__name__}{detail}); is it a complete timm "
                ".safetensors/.pth/.bin file? Download or copy it again")
    elif errors.is_user_error(e):
        text = errors.message(e)
    else:
        raise e
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return errors.EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
