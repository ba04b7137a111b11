"""timm's weights straight from the Hugging Face hub: download, convert once, keep the converted file.

`fetch("vit_small_patch16_224", "dino")` downloads `timm/vit_small_patch16_224.dino` (model.safetensors,
else pytorch_model.bin, and config.json) with huggingface_hub into its usual cache (HF_HOME / HF_HUB_CACHE;
HF_HUB_OFFLINE=1 uses only the cache), converts it with the numpy key maps of `checkpoints_convert`, and
writes the converted checkpoint under `<HF_HOME>/vitsparse_jax/converted/` (or $VITSPARSE_JAX_CACHE),
keyed by the repository's revision, so that later runs load it without converting again.

The caches can break: a converted copy that is incomplete (an interrupted write, a full disk) is converted
again; a hub file whose content does not match its sha256 (or cannot be read) is an error naming the
repository's folder to delete; a cache folder that cannot be written (a shared, read-only HF_HOME) is an
error naming $VITSPARSE_JAX_CACHE, the variable that moves the converted copies elsewhere.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

from vitsparse_jax.runtime.errors import UserError
from vitsparse_jax.runtime.hashing import sha256_file
import vitsparse_jax.weights.checkpoint as checkpoint
import vitsparse_jax.weights.pretrained as pretrained
import vitsparse_jax.weights.safetensors_io as safetensors_io
import vitsparse_jax.weights.timm_state as timm_state

log = logging.getLogger(__name__)

# Bumped when a key map changes what it writes: older converted files are then converted again.
CONVERTER_VERSION = 1
CACHE_ENV = "VITSPARSE_JAX_CACHE"
# Seconds to wait for a TCP connection to the hub before using the local cache alone.
PROBE_TIMEOUT = 3.0


class HubUnavailableError(FileNotFoundError):
    """The weights are not in the local Hugging Face cache and the hub cannot be reached (or is off)."""


class CacheError(UserError, OSError):
    """A cache folder cannot be written, or holds a damaged file; the message says what to delete or set."""


class HubFiles(NamedTuple):
    repo_id: str
    revision: str
    weights: Path               # model.safetensors or pytorch_model.bin in the hub cache
    config: dict[str, Any] | None   # the repository's config.json (timm's pretrained_cfg), if any


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder huggingface_hub downloads into (HF_HUB_CACHE, by default <HF_HOME>/hub)."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def converted_dir() -> Path:
    """Where converted hub weights are kept: $VITSPARSE_JAX_CACHE, else <HF_HOME>/vitsparse_jax/converted."""
    from huggingface_hub import constants

    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path(constants.HF_HOME) / "vitsparse_jax" / "converted"


def _name(arch: str, tag: str) -> str:
    return f"{arch}.{tag}"


def unavailable(arch: str, tag: str, repo_id: str, cache_dir: Path, reason: str = "") -> HubUnavailableError:
    """The error of weights that are neither cached nor downloadable: what, where, the two ways out."""
    name = _name(arch, tag)
    why = ("HF_HUB_OFFLINE is set" if offline() else
           "the hub cannot be reached" + (f" ({reason})" if reason else ""))
    return HubUnavailableError(
        f"no weights for {name}: {repo_id} is not in the Hugging Face cache {cache_dir} and {why}.\n"
        f"Fill that cache where the hub is reachable (one run online) and run with HF_HUB_OFFLINE=1, or give a "
        f"local file: --config.weights=/path/to/model.safetensors (or python -m checkpoints_convert --model "
        f"{name} --from-file /path/to/model.safetensors --out checkpoints).")


def _revision(path: Path) -> str:
    """The snapshot (commit hash) folder of a file in the hub cache layout."""
    parts = path.parts
    if "snapshots" in parts[:-1]:
        return parts[len(parts) - 1 - parts[::-1].index("snapshots") + 1]
    return "local"


def is_cached(arch: str, tag: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the tag's weights are in the local hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = pretrained.hub_location(arch, tag)
    for name in ([filename] if filename else timm_state.HUB_WEIGHTS):
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(hub_cache_dir(cache_dir)))
        if isinstance(found, str):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str, timeout: float) -> str:
    """'' when a TCP connection to the hub (or the proxy in front of it) opens within `timeout` s, else why not."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname or host, purl.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return ""
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"


def unreachable() -> str:
    """Why the hub cannot be reached ('' when it can): offline mode, or no connection within a few seconds.

    huggingface_hub retries a failed request for about 25 s before it falls back to its cache; this check
    takes at most PROBE_TIMEOUT s, after which the cache is used alone (or the clear error is raised)."""
    from huggingface_hub import constants

    if offline():
        return "HF_HUB_OFFLINE is set"
    return _probe(constants.ENDPOINT, PROBE_TIMEOUT)


def download(arch: str, tag: str, cache_dir: str | os.PathLike | None = None) -> HubFiles:
    """The tag's timm weights and config.json, from the local hub cache or downloaded into it (progress bar)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    repo_id, filename = pretrained.hub_location(arch, tag)
    cache = hub_cache_dir(cache_dir)
    why = unreachable()
    if why and not offline():
        log.warning("the Hugging Face hub cannot be reached (%s); using the local cache %s only", why, cache)
    candidates = [filename] if filename else list(timm_state.HUB_WEIGHTS)
    weights = None
    for i, name in enumerate(candidates):
        try:
            weights = Path(hf_hub_download(repo_id, name, cache_dir=str(cache), local_files_only=bool(why)))
            break
        except LocalEntryNotFoundError as e:   # not cached, and offline or unreachable
            if why and i < len(candidates) - 1:
                continue                    # another weights file may be cached
            raise unavailable(arch, tag, repo_id, cache, why or str(e.__cause__ or e)) from e
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:   # includes gated repositories
            raise ValueError(f"no weights for {_name(arch, tag)}: the Hugging Face hub has no repository "
                             f"{repo_id} ({type(e).__name__}); {pretrained.tags_hint(arch)}") from e
        except EntryNotFoundError:          # the repository lacks this file: try the next one
            if i == len(candidates) - 1:
                raise ValueError(f"{repo_id} on the Hugging Face hub has none of {', '.join(candidates)}") from None
    assert weights is not None
    revision = _revision(weights)
    config = None
    try:   # a commit hash whose file is cached needs no network
        config_path = hf_hub_download(repo_id, "config.json", cache_dir=str(cache), local_files_only=bool(why),
                                      revision=revision if revision != "local" else None)
        config = json.loads(Path(config_path).read_text())
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        log.info("%s has no config.json; the pretrained_cfg comes from the shipped table", repo_id)
    except (ValueError, UnicodeDecodeError) as e:
        files = HubFiles(repo_id, revision, Path(config_path), None)
        raise _damaged_download(files, arch, tag, f"is not valid JSON ({e})") from None
    return HubFiles(repo_id, revision, weights, config)


def converted_path(repo_id: str, revision: str, arch: str, tag: str) -> Path:
    folder = re.sub(r"[^A-Za-z0-9_.-]", "--", repo_id)
    return converted_dir() / f"v{CONVERTER_VERSION}" / folder / revision / f"{_name(arch, tag)}.safetensors"


def repo_folder(repo_id: str) -> Path:
    """The repository's folder in huggingface_hub's cache (models--<org>--<name>)."""
    return hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"


def incomplete(path: Path) -> str:
    """Why the converted checkpoint at `path` cannot be used as it is ('' when it is whole): its .json must
    parse, and its .safetensors must hold exactly the bytes its header lists."""
    try:
        checkpoint.read_meta(path)
        header, start = safetensors_io.read_header(path)
    except (OSError, ValueError) as e:
        return str(e).split(". ")[0]
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    return "" if start + end == size else f"{path.name} holds {size} bytes, its header lists {start + end}"


def _writable(folder: Path, name: str) -> None:
    """CacheError naming $VITSPARSE_JAX_CACHE when the converted copies cannot be written to `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        if os.environ.get(CACHE_ENV):
            where = f"{CACHE_ENV} points there; set it to a folder you can write"
        else:
            from huggingface_hub import constants

            where = (f"converted copies go to <HF_HOME>/vitsparse_jax/converted unless {CACHE_ENV} says otherwise, "
                     f"and HF_HOME ({constants.HF_HOME}) cannot be written here (a shared, read-only cache?): set "
                     f"{CACHE_ENV} to a folder you can write, e.g. export {CACHE_ENV}=~/.cache/vitsparse_jax")
        raise CacheError(f"cannot keep the converted copy of {name} in {folder} ({e.strerror or e}); {where}"
                         ) from None


def _damaged_download(files: HubFiles, arch: str, tag: str, why: str) -> CacheError:
    snapshot = files.weights.parent   # <cache>/models--<org>--<name>/snapshots/<revision>/<file>
    folder = snapshot.parents[1] if snapshot.parent.name == "snapshots" else repo_folder(files.repo_id)
    return CacheError(f"the Hugging Face cache's copy of {files.repo_id} is damaged: {files.weights.name} {why}. "
                      f"Delete that repository's folder, rm -r '{folder}', and run again where the hub is reachable "
                      f"(it downloads {_name(arch, tag)} again), or use a good copy of the file: --config.weights=FILE "
                      f"(python -m checkpoints_convert --from-file FILE)")


def check_download(files: HubFiles, arch: str, tag: str) -> None:
    """huggingface_hub names the blob of a weights file (git LFS) by its sha256: a mismatch is a damaged copy."""
    blob = files.weights.resolve()
    if not re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return
    if sha256_file(blob) != blob.name:
        raise _damaged_download(files, arch, tag, f"({blob}) does not match its sha256 (a truncated or altered "
                                                  f"download)")


def fetch(arch: str, tag: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted checkpoint of arch.tag from the hub: downloaded and converted on first use, then reused
    (an incomplete converted copy is converted again)."""
    pretrained.check_tag(arch, tag)
    files = download(arch, tag, cache_dir)
    path = converted_path(files.repo_id, files.revision, arch, tag)
    if path.with_suffix(".json").exists():   # the .json is written last: complete, unless damaged since
        why = incomplete(path)
        if not why:
            return path
        log.warning("the converted copy %s is damaged (%s); converting %s again", path, why, files.repo_id)
    _writable(path.parent, _name(arch, tag))
    check_download(files, arch, tag)
    log.info("converting %s (%s) to %s", files.repo_id, files.weights.name, path.parent)
    try:
        _, flat, cfg = timm_state.convert_file(arch, tag, files.weights, files.config)
    except (safetensors_io.SafetensorsError, timm_state.UnreadableFile) as e:
        raise _damaged_download(files, arch, tag, f"cannot be read ({e})") from None
    return checkpoint.save(path.parent, arch, tag, flat, cfg, f"hf-hub:{files.repo_id}@{files.revision}")
