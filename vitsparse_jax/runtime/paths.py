"""Path fields as users type them: `~` and environment variables expanded (no ml_collections needed here)."""
from __future__ import annotations

import os
from typing import Any


def expand_path(path: Any) -> Any:
    """`~` and `$VAR` / `${VAR}` expanded (a variable that is not set stays as written); other values
    (None, numbers, '') unchanged. URLs such as gs://bucket/dir are left as they are."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        return path
    return os.path.expanduser(os.path.expandvars(os.fspath(path)))
