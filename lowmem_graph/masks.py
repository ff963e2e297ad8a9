"""A node's attention masks, made on the host at collation: the one decision in a node's forward that reads values.

transformers' SDPA mask builder asks whether the 2D attention mask is all ones (masking_utils.
_ignore_causal_mask_sdpa: then it makes no mask and SDPA takes its is_causal path). Made on the device inside a
step, that question is a read of the device per node and micro-batch. Here transformers' own
`create_masks_for_generate` (what `generate` hands a model's forward: a mask per layer type, or the model's one
mask) makes them from the host's 2D mask at collation, so the host answers it, and the masks travel in the
micro-batch's one copy (transfer.py). A model handed them makes none of its own: its layers get the masks it would
have made, bit for bit.
"""
from __future__ import annotations

from contextlib import contextmanager
from inspect import signature

import torch

from .hooks import LayerHook, add_hook

ONE = ""        # the key of a model's one mask (a model without layer types gives every layer the same)
# "no mask" as a model's forward is handed it: 4D, so its mask functions pass it on as made, and on the meta
# device, so that it fails loudly if it reaches anything but `_Unmasked`, which hands the layers None.
NO_MASK = torch.empty((0, 0, 0, 0), dtype=torch.bool, device="meta")


def host_masks(model, attention_mask: torch.Tensor) -> dict | None:
    """{layer type, or ONE: the 4D mask its layers take, or None for no mask} for a (B, T) host mask, made by
    transformers on the host. None where the model makes its own without a read (eager attention, whose masks are
    always made) or where transformers leaves it to the model (flash, flex, layer types it has no mask for)."""
    from transformers.masking_utils import create_masks_for_generate

    config = model.config.get_text_config()
    if config._attn_implementation != "sdpa":
        return None
    shape = (*attention_mask.shape, 0)          # only its size and device are read
    # the cache is the 4th argument since 5.10 (`past_key_values`, then `cache`); 5.0-5.9 take cache_position first
    positions = (torch.arange(shape[1]),) if "cache_position" in signature(create_masks_for_generate).parameters else ()
    made = create_masks_for_generate(config, torch.empty(shape), attention_mask, *positions, None)
    if made is attention_mask:
        return None
    return made if isinstance(made, dict) else {ONE: made}


@contextmanager
def handed(layers, attention_mask: torch.Tensor, masks: dict | None, device):
    """What a model's forward is handed as `attention_mask`: without `masks`, the 2D mask (the model makes its
    own); with them (moved to `device` if not there yet), the dict by layer type, or the one mask, or for no mask
    NO_MASK while each of `layers` is handed None."""
    if masks is None:
        yield attention_mask.to(device)
        return
    masks = {k: None if m is None else m.to(device) for k, m in masks.items()}
    given = masks if ONE not in masks else NO_MASK if masks[ONE] is None else masks[ONE]
    handles = [add_hook(layer, _Unmasked()) for layer in layers] if given is NO_MASK else []
    try:
        yield given
    finally:
        for handle in handles:
            handle.remove()


class _Unmasked(LayerHook):
    """None for NO_MASK in a layer's call (outermost: a stand-in recording the call sees None)."""

    where = "call"

    def pre_forward(self, module, *args, **kwargs):
        return (tuple(None if a is NO_MASK else a for a in args),
                {k: None if v is NO_MASK else v for k, v in kwargs.items()})
