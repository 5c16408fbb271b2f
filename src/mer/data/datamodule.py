"""LightningDataModule over in-memory flow samples for one split (a LOSO fold, a client...)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from mer.data.samples import FlowSamples


class TensorBatches(Dataset):
    """Indexed by a *list* of positions, returns a whole batch ``tuple(t[idx] for t in tensors)``.

    Used with ``batch_size=None`` and a ``BatchSampler``: one tensor gather per batch instead of
    a Python call and a collate per sample.
    """

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(index, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


def batch_loader(
    *tensors: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader of whole batches over in-memory tensors with a common first dimension N
    (e.g. x (N, C, H, W), y (N,))."""
    data = TensorBatches(*tensors)
    if shuffle:
        base = RandomSampler(data, generator=torch.Generator().manual_seed(seed))
    else:
        base = SequentialSampler(data)
    return DataLoader(data, sampler=BatchSampler(base, batch_size, drop_last=False),
                      batch_size=None)


class SplitDataModule(L.LightningDataModule):
    """Train / validation / test positions into one :class:`FlowSamples`.

    Batches are ``(x, y)``, or ``(x, y, au, au_mask[, landmarks])`` with ``with_aus``: au (B, 12)
    multi-hot over the FED-PsyAU AUs, au_mask (B,) bool, False where the database has no AU
    labels, landmarks (B, 68, 2) in x's pixel frame when the samples have them. Without
    ``with_aus``, the samples' named inputs (``samples.inputs``: face crops, frame stacks...,
    :mod:`mer.data.inputs`) follow ``(x, y)`` in their order: ``(x, y, apex_crop)``.

    Args:
        samples: all samples (x (N, C, H, W) float32).
        train_idx, val_idx, test_idx: int positions; val may be empty.
        batch_size: batch size for every loader.
        shuffle: shuffle training batches (seeded); the STSTNet reference does not.
    """

    def __init__(
        self, samples: FlowSamples, train_idx: np.ndarray, test_idx: np.ndarray,
        val_idx: np.ndarray | None = None, batch_size: int = 64, shuffle: bool = True,
        seed: int = 0, with_aus: bool = False,
    ) -> None:
        super().__init__()
        self.tensors = [torch.from_numpy(np.ascontiguousarray(samples.x, dtype=np.float32)),
                        torch.as_tensor(samples.labels.copy())]
        if with_aus:
            au, mask = samples.au_targets()
            self.tensors += [torch.tensor(au), torch.tensor(mask)]
            if samples.landmarks is not None:
                self.tensors.append(torch.tensor(samples.landmarks, dtype=torch.float32))
        else:
            self.tensors += [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                             for a in samples.inputs.values()]
        self.input_names = () if with_aus else tuple(samples.inputs)
        self.train_idx = np.asarray(train_idx)
        self.val_idx = np.asarray(val_idx if val_idx is not None else [], dtype=np.int64)
        self.test_idx = np.asarray(test_idx)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        if len(self.train_idx) == 0:
            raise ValueError("empty training split: no training sample left for this fold")

    def _loader(self, idx: np.ndarray, shuffle: bool) -> DataLoader:
        t = torch.as_tensor(idx, dtype=torch.long)
        return batch_loader(*(x[t] for x in self.tensors), batch_size=self.batch_size,
                            shuffle=shuffle, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_idx, self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_idx, False) if len(self.val_idx) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_idx, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_idx, False)
