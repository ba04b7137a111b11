"""The maps of one image for Fig. 1 (one head of the last block) and Fig. S1 (every head of a block)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from vitsparse_jax import data
from vitsparse_jax.experiments.contract import Context
from vitsparse_jax.experiments.sparsity import stats as st
from vitsparse_jax.experiments.sparsity.probe import Example, Probe


def resolve_index(index: int, size: int, what: str) -> int:
    """Python-style index (negative = from the end) into `size` items, with a clear error when out of range."""
    if not -size <= index < size:
        raise ValueError(f"{what} = {index} is out of range: there are {size} (valid: {-size} .. {size - 1})")
    return index % size


def _window(maps: np.ndarray, index: np.ndarray | None, token: int) -> tuple[np.ndarray, str]:
    """One image's maps of a block -> (heads, rows, cols) to draw and a title suffix. ViT: the maps as they
    are; Swin (nW, heads, T, T): those of the window that holds raster token `token`."""
    if index is None:
        return maps, ""
    window = int(np.argwhere(index == token)[0, 0])
    return maps[window], f", window {window}"


@dataclasses.dataclass(frozen=True)
class ExampleChoice:
    image: int   # index in the dataset
    head: int    # Fig. 1: head of the last block
    block: int   # Fig. S1


def example_choice(probe: Probe, source: Any, cfg: Any) -> ExampleChoice:
    """Checks the Fig. 1 / S1 options against the model and the data (before the long pass)."""
    return ExampleChoice(
        image=resolve_index(int(cfg.example_index), len(source), "sparsity.example_index (an image of the dataset)"),
        head=resolve_index(int(cfg.head), probe.layout.heads, "sparsity.head (a head of the last block)"),
        block=resolve_index(int(cfg.s1_block), len(probe.names), "sparsity.s1_block (a block)"))


def example_values(probe: Probe, choice: ExampleChoice) -> Any:
    """aux (the captures of a forward pass whose first image is the example) -> what Fig. 1 and S1 need of
    that image (jax; inside a jitted program): the maps of the two blocks and their column means."""
    last = len(probe.names) - 1
    captures = (probe.captures[last], probe.captures[choice.block])

    def values(aux: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], st.Pair, st.Pair]:
        one = {c: aux[c][:1] for c in captures}
        return one, probe.column_means(one, last)[1], probe.column_means(one, choice.block)[0]

    return values


def example(loaded: Any, probe: Probe, ctx: Context, choice: ExampleChoice) -> Example:
    """The maps of one image for Fig. 1 (one head of the last block) and S1 (every head of a block), from a
    forward pass of its own (`explorer.forward` shares the explorer's instead)."""
    i = choice.image
    batch, _ = ctx.host_batch(loaded, i, i + 1)
    check_readable(batch, ctx, choice)
    values = example_values(probe, choice)
    captures = tuple(dict.fromkeys((probe.captures[-1], probe.captures[choice.block])))

    def maps(variables: Any, image: jax.Array) -> Any:
        """One program (nothing runs op by op): normalisation, the forward pass, the two blocks' column means."""
        _, aux = loaded.module.apply(variables, data.normalize(image, loaded.pretrained_cfg), capture=captures)
        return values(aux)

    return example_from(loaded, probe, choice, batch["image"][0],
                        jax.device_get(jax.jit(maps)(loaded.variables, batch["image"][:1])))


def check_readable(batch: dict[str, np.ndarray], ctx: Context, choice: ExampleChoice) -> None:
    """The example image (row 0 of `batch`) must be readable: else a clear error before any figure."""
    if not batch["valid"][0]:
        i = choice.image
        raise ValueError(f"image {i} of {ctx.source.name} could not be read ({ctx.source.skipped.get(i)}); "
                         "choose another sparsity.example_index")


def example_from(loaded: Any, probe: Probe, choice: ExampleChoice, image: np.ndarray, values: Any) -> Example:
    """`Example` of the image (S, S, 3) uint8 from its `example_values` (on the host)."""
    lay: st.AttentionLayout = probe.layout
    i, head, s1, last = choice.image, choice.head, choice.block, len(probe.names) - 1
    captures = (probe.captures[last], probe.captures[s1])
    aux, mu_h, mu_s1 = values
    mu_h, mu_s1 = st.hi_lo(mu_h), st.hi_lo(mu_s1)
    p, grid = lay.prefix, lay.grids[last]
    # Fig. 1: the brightest patch columns of this head (its mu_h); S1: around the block's brightest column
    top = np.argsort(-np.asarray(mu_h)[0, head, p:], kind="stable")[:3]
    last_maps, where = _window(np.asarray(aux[captures[0]][0]), probe.token_index[last], int(top[0]))
    s1_maps, s1_where = _window(np.asarray(aux[captures[1]][0]), probe.token_index[s1],
                                int(np.argmax(np.asarray(mu_s1)[0, p:])))
    names = (probe.names[last], probe.names[s1])
    return Example(
        index=i, image=np.asarray(image), head_map=last_maps[head], head_title=f"{names[0]} head {head}{where}",
        top_cells=[divmod(int(j), grid[1]) for j in top], heads=s1_maps,
        heads_title=f"{loaded.name}: every head of {names[1]}{s1_where}, image {i}")


# ---------------------------------------------------------------------------------------------------------
# The experiment
