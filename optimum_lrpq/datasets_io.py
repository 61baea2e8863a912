"""Load a calibration dataset named in an `LRPQConfig` (hub name, saved `datasets` directory, or image folder)."""

from __future__ import annotations

import os


def load_calibration_dataset(name_or_path: str, split: str, num_samples: int):
    """The first `num_samples` examples of `split`, from a hub name or a local directory."""
    import datasets

    if os.path.isdir(name_or_path):
        if os.path.exists(os.path.join(name_or_path, "dataset_dict.json")) or os.path.exists(
            os.path.join(name_or_path, "dataset_info.json")
        ):
            loaded = datasets.load_from_disk(name_or_path)
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=name_or_path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"The dataset at {name_or_path!r} has no split {split!r}; splits: {list(loaded)}.")
            loaded = loaded[split]
        return loaded.select(range(min(num_samples, len(loaded))))
    # Streaming avoids downloading a whole dataset (e.g. ImageNet) to read a few calibration images.
    return datasets.load_dataset(name_or_path, split=split, streaming=True).take(num_samples)
