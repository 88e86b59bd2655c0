"""Which layers to remove, as the user names them: `--layers 21:29` (half-open) or `3,7,12`, checked
against a layer count. Without torch, so that the checks before loading can use it."""

from __future__ import annotations

from collections.abc import Iterable

from depthcut.errors import DepthcutError


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    """Parse ``"21:29"`` (half-open) or ``"3,7,12"`` (or a mix) into sorted 0-based indices."""
    indices: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise DepthcutError(f"malformed --layers {spec!r}: empty item")
        try:
            if ":" in part:
                start_text, _, stop_text = part.partition(":")
                start, stop = int(start_text), int(stop_text)
                if stop <= start:
                    raise DepthcutError(
                        f"malformed --layers item {part!r}: a block start:stop is half-open and needs stop > start"
                    )
                indices.extend(range(start, stop))
            else:
                indices.append(int(part))
        except ValueError:
            raise DepthcutError(
                f"malformed --layers {spec!r}: use 0-based indices like '3,7,12' or a half-open block like '21:29'"
            ) from None
    return validate_layers(indices, num_layers)


def validate_layers(layers: Iterable[int], num_layers: int) -> list[int]:
    layers = list(layers)
    if not layers:
        raise DepthcutError("no layers to remove")
    duplicates = sorted({i for i in layers if layers.count(i) > 1})
    if duplicates:
        raise DepthcutError(f"layers listed more than once: {duplicates}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise DepthcutError(
            f"layer indices {bad} are out of range: this model has {num_layers} layers, numbered 0..{num_layers - 1}"
        )
    if len(layers) >= num_layers:
        raise DepthcutError(f"cannot remove all {num_layers} layers; at least one must stay")
    return sorted(layers)
