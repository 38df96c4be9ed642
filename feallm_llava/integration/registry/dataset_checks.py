"""Upstream's `LazySupervisedDataset` names bad samples, or skips and counts them.

`--skip_bad_samples` (a `DataArguments` flag, `train_flags.py`): a missing or unreadable
image, or a conversation without `<image>`, stops the run naming the sample (index, id,
image), or is skipped and counted.
"""

from __future__ import annotations

import logging

from feallm_llava.integration.marks import wrap

log = logging.getLogger(__name__)


def check_dataset(cls) -> None:
    """Wrap the dataset class's `__init__` and `__getitem__` in place.

    In place: upstream calls `super(LazySupervisedDataset, self)` with the module-level
    name, so a subclass bound to that name would recurse.
    """
    from feallm_llava.data.llava_json import check_samples

    def initialising(init):
        def __init__(self, data_path, tokenizer, data_args):
            init(self, data_path=data_path, tokenizer=tokenizer, data_args=data_args)
            self.skip_bad = bool(getattr(data_args, "skip_bad_samples", False))
            self.skipped = []
            bad = check_samples(self.list_data_dict, getattr(data_args, "image_folder", None))
            if bad and not self.skip_bad:
                listing = "\n  ".join(str(b) for b in bad[:10])
                raise ValueError(
                    f"{data_path}: {len(bad)} bad sample(s):\n  {listing}\n"
                    "Fix them, or pass --skip_bad_samples True to skip and count them."
                )
            if bad:
                drop = {b.index for b in bad}
                self.list_data_dict = [s for i, s in enumerate(self.list_data_dict) if i not in drop]
                self.skipped = [str(b) for b in bad]
                log.warning("%s: skipped %d bad sample(s), e.g. %s", data_path, len(bad), bad[0])
            if not self.list_data_dict:
                raise ValueError(f"{data_path}: no usable sample left")
        return __init__

    def getting(getitem):
        def __getitem__(self, i):
            for attempt in range(len(self.list_data_dict)):
                j = (i + attempt) % len(self.list_data_dict)
                try:
                    return getitem(self, j)
                except Exception as err:  # an unreadable image etc.: name the sample
                    sample = self.list_data_dict[j]
                    where = f"sample #{j} (id {sample.get('id', j)!r}, image {sample.get('image')!r})"
                    if not self.skip_bad:
                        raise RuntimeError(f"{where}: {type(err).__name__}: {err}. "
                                           "Pass --skip_bad_samples True to skip and count such samples.") from err
                    self.skipped.append(f"{where}: {err}")
                    log.warning("skipping %s: %s (%d skipped so far)", where, err, len(self.skipped))
            raise RuntimeError("every sample of the dataset failed to load")
        return __getitem__

    wrap(cls, "__init__", "dataset_checks", initialising)
    wrap(cls, "__getitem__", "dataset_checks", getting)
