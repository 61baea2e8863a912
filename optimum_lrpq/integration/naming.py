"""The two names of a checkpoint tensor: the transformers 5.x module path and the legacy name on disk.

In memory a ViT's first MLP layer is `vit.layers.1.mlp.fc1` (that is also how `config.json`'s `layer_bits` and
`optimum-lrpq inspect` name it), but `save_pretrained` writes its tensors under the 4.x names
(`vit.encoder.layer.1.intermediate.dense.qweight`), and `from_pretrained` renames them back. Both directions
come from transformers' own conversion mapping (`transformers.conversion_mapping`), applied the way
`from_pretrained` (loading) and `revert_weight_conversion` (saving) apply it, so the names here are always the ones
transformers itself would use; nothing is mapped by hand.

Errors about a checkpoint name both, so that a user can find the tensor in the file and the layer in the model:
"`vit.layers.1.mlp.fc1.qweight` (stored as `vit.encoder.layer.1.intermediate.dense.qweight`)".
"""

from __future__ import annotations

import copy

from torch import nn


class TensorNames:
    """Translates tensor names of `model` between its modules (5.x names) and its checkpoint files (legacy names)."""

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

        used = getattr(model, "_weight_conversions", None)  # what from_pretrained applied, kept for saving
        # Loading: the mapping from_pretrained applies (with its legacy renamings) when nothing was recorded yet.
        loading = list(used) if used is not None else get_model_conversion_mapping(model)
        # Saving: as `revert_weight_conversion` (no legacy renamings, no prefix change on a model built in memory),
        # reversed and applied last transform first.
        saving = list(used) if used is not None else [
            c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
        saving = [c.reverse_transform() for c in saving[::-1]]
        loading = copy.deepcopy(loading)  # renaming marks transforms as used; keep the model's own untouched

        def split(transforms):
            return ([t for t in transforms if isinstance(t, WeightRenaming)],
                    [t for t in transforms if isinstance(t, WeightConverter)])

        self._loading, self._saving = split(loading), split(saving)

    def stored(self, name: str) -> str:
        """The name `save_pretrained` writes the model's tensor `name` under."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(name, *self._saving, reverse=True)[0]

    def loaded(self, stored: str) -> str:
        """The model tensor `from_pretrained` loads the checkpoint tensor `stored` into."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(stored, *self._loading)[0]

    def describe(self, name: str) -> str:
        """The model's tensor `name`, with its on-disk name when that differs."""
        return both_names(name, self.stored(name))

    def describe_stored(self, stored: str) -> str:
        """The checkpoint tensor `stored`, with the model tensor name it loads as first when that differs."""
        return both_names(self.loaded(stored), stored)


def both_names(name: str, stored: str) -> str:
    """"`name` (stored as `stored`)", or just "`name`" when the two are the same."""
    return f"`{name}`" if name == stored else f"`{name}` (stored as `{stored}`)"
