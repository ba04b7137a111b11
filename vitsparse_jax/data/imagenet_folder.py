"""ILSVRC2012_img_val.tar -> ImageNet-style folder <out>/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG, no TensorFlow.

The labels are TFDS's `imagenet2012/validation_labels.txt` (one wnid per validation image, in file-name
order), the same TFDS uses to build imagenet2012. The files are copied byte for byte.

    python -m vitsparse_jax.data.imagenet_folder ILSVRC2012_img_val.tar ~/data/imagenet/val
"""
from __future__ import annotations

import argparse
import os
import re
import tarfile
from importlib import resources

_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")


def validation_wnids() -> list[str]:
    """wnid of validation image n (1-based) at position n - 1."""
    path = resources.files("tensorflow_datasets") / "datasets" / "imagenet2012" / "validation_labels.txt"
    return path.read_text().split()


def extract_validation(tar_path: str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Streams the tar into wnid folders; returns the number of images written."""
    wnids = validation_wnids()
    count = 0
    with tarfile.open(os.fspath(tar_path), mode="r|*") as tar:
        for member in tar:
            name = os.path.basename(member.name)
            match = _VAL_NAME.match(name)
            if not member.isfile() or not match:
                continue
            target_dir = os.path.join(os.fspath(out_dir), wnids[int(match.group(1)) - 1])
            os.makedirs(target_dir, exist_ok=True)
            target = os.path.join(target_dir, name)
            with tar.extractfile(member) as src, open(target + ".tmp", "wb") as dst:
                dst.write(src.read())
            os.replace(target + ".tmp", target)
            count += 1
    if not count:
        raise ValueError(f"{tar_path} holds no ILSVRC2012_val_XXXXXXXX.JPEG files")
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("val_tar", help="path of ILSVRC2012_img_val.tar")
    parser.add_argument("out_dir", help="folder to create (one subfolder per wnid)")
    args = parser.parse_args(argv)
    n = extract_validation(args.val_tar, args.out_dir)
    print(f"wrote {n} images to {args.out_dir}; use data.source='folder', data.folder={args.out_dir!r}")


if __name__ == "__main__":
    main()
