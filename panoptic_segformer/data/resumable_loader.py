"""A training data loader whose position is part of the checkpoint, so that ``--resume`` continues the
exact data order and augmentations of an uninterrupted run.

Detectron2's ``build_detection_train_loader`` draws the order from a ``TrainingSampler`` that restarts
at its first index on every start, and the augmentations from the DataLoader workers' numpy streams,
which restart too: a resumed run trains on other images with other augmentations than the run it
continues. :class:`ResumableTrainLoader` replaces it for ``DATALOADER.SAMPLER_TRAIN: TrainingSampler``:

- **Order.** One global stream of dataset indices, ``randperm(N)`` per epoch from a generator seeded with
  the data seed (the order of Detectron2's ``TrainingSampler`` with that seed). Stream position ``p``
  is epoch ``p // N``. Iteration ``i`` trains on the next ``SOLVER.IMS_PER_BATCH`` positions; rank ``r``
  of ``W`` takes the batch's elements ``r, r + W, ...`` (without aspect-ratio grouping these are the
  positions Detectron2's sampler gives rank ``r``).
- **Aspect-ratio grouping** (``DATALOADER.ASPECT_RATIO_GROUPING``): the stream is grouped before it is
  split among the ranks, by the dataset dicts' width and height (landscape or not, as Detectron2's
  ``AspectRatioGroupedDataset``), into global batches; the two partly filled buckets are part of the
  state. A global batch is then the same for any number of processes.
- **Augmentation.** Every sample is mapped with numpy's, Python's and torch's random generators seeded
  from ``(data seed, stream position, dataset index)`` (``np.random.SeedSequence``), and the caller's
  generator states restored afterwards: the flip, scale and crop of a sample do not depend on which
  process or DataLoader worker maps it, nor on what was mapped before.
- **State.** :meth:`ResumableTrainLoader.state_dict` is the stream position and buckets after the last
  batch the *trainer* received (DataLoader workers prefetch ahead; the prefetched batches are not
  counted), the data seed and the geometry; the Trainer stores it in every checkpoint and
  :meth:`~ResumableTrainLoader.load_state_dict` restores it before the first batch.

Exact when resumed with the same ``SOLVER.IMS_PER_BATCH`` and number of processes; the number of
DataLoader workers does not matter. With another number of processes every iteration still trains on
the same images with the same augmentations, split differently among the processes (results then
differ by floating-point rounding; logged as a warning). Another batch size or dataset is a warning
that says what changes.
"""
import atexit
import collections
import functools
import itertools
import logging
import random
import weakref
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from ..resume import ignore_signals

__all__ = ["ResumableTrainLoader", "global_batches", "sample_seed"]

logger = logging.getLogger(__name__)


def sample_seed(seed: int, position: int, index: int) -> np.random.SeedSequence:
    """The seed sequence of the sample at stream `position` (dataset `index`) of a run seeded `seed`."""
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(position), int(index)])


def _epoch_permutations(seed: int, size: int, shuffle: bool, first_epoch: int):
    """Index permutations of epochs first_epoch, first_epoch + 1, ... (Detectron2 TrainingSampler's order:
    one generator seeded once, ``randperm`` per epoch)."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    for epoch in itertools.count():
        perm = torch.randperm(size, generator=g).tolist() if shuffle else list(range(size))
        if epoch >= first_epoch:
            yield perm


def global_batches(seed: int, size: int, batch_size: int, position: int = 0, buckets=None,
                   group_ids: Optional[np.ndarray] = None, shuffle: bool = True):
    """Infinite generator of ``(batch, state)``: ``batch`` a list of ``(position, index)`` of one global
    batch, ``state`` the ``{"position", "buckets"}`` to resume from after it. Starts at stream `position`
    with the partly filled `buckets` (aspect-ratio grouping: `group_ids` gives each index's group)."""
    buckets = [list(map(tuple, b)) for b in buckets] if buckets else [[], []]
    epoch, offset = divmod(int(position), size)
    for perm in _epoch_permutations(seed, size, shuffle, epoch):
        for i in range(offset, size):
            pos, index = epoch * size + i, perm[i]
            bucket = buckets[int(group_ids[index]) if group_ids is not None else 0]
            bucket.append((pos, index))
            if len(bucket) >= batch_size:
                batch = bucket[:batch_size]
                del bucket[:batch_size]
                yield batch, {"position": pos + 1, "buckets": [list(b) for b in buckets]}
        epoch, offset = epoch + 1, 0


class _BatchSampler:
    """This rank's share of every global batch, as lists of ``(position, index)``; records the state
    after each batch in ``states`` (read by the main process in the order the batches arrive)."""

    def __init__(self, loader):
        self.loader, self.states = loader, collections.deque()

    def __iter__(self):
        s, rank, world = self.loader._state, self.loader.rank, self.loader.world_size
        for batch, state in global_batches(s["seed"], self.loader.size, self.loader.total_batch_size,
                                           s["position"], s["buckets"], self.loader.group_ids, self.loader.shuffle):
            self.states.append(state)
            yield batch[rank::world]


class _SeededMapDataset(torchdata.Dataset):
    """``dataset[index]`` through `mapper` with the random generators seeded per sample (module docstring)."""

    def __init__(self, dataset, mapper, seed_fn):
        self.dataset, self.mapper, self.seed_fn = dataset, mapper, seed_fn

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        position, index = key
        seq = self.seed_fn(position, index)
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                np.random.seed(seq.generate_state(4))
                random.seed(int(seq.generate_state(2, np.uint64)[0]))
                torch.manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))
                data = self.mapper(self.dataset[index])
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        if data is None:
            raise ValueError(f"the training dataset mapper returned None for dataset index {index} (stream "
                             f"position {position}); a resumable data order needs every image mapped: filter "
                             "images out of the dataset instead")
        return data


def _image_size(dataset_dict):
    """(width, height) of a dataset dict's image: its "width" / "height", else read from the file's header."""
    if "width" in dataset_dict and "height" in dataset_dict:
        return dataset_dict["width"], dataset_dict["height"]
    from PIL import Image

    with Image.open(dataset_dict["file_name"]) as im:  # reads the header only
        w, h = im.size
        # as the mapper reads it: EXIF orientations 5-8 are rotated by 90 degrees (detection_utils.read_image)
        return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def _as_list(batch):
    return batch


# Iterators whose DataLoader workers may still run. Workers that ignore SIGTERM (``ignore_signals``) would
# not end on the SIGTERM that multiprocessing's exit handler sends to daemonic children before joining them,
# which happens when the trainer (and so this iterator) is still alive at exit -- after a preemption, say.
# This exit handler, registered after multiprocessing's and so run before it, shuts them down the way the
# DataLoader does when it is garbage-collected (a sentinel on each worker's queue, then join).
_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _shut_down_live_workers():
    for batches in list(_LIVE_ITERATORS):
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's _MultiProcessingDataLoaderIter
        if shutdown is not None:
            shutdown()


class ResumableTrainLoader:
    """Iterable of this rank's training batches (lists of mapped dicts) with a checkpointable position
    (see the module docstring).

    Args:
        dataset: list of dataset dicts.
        mapper: dataset dict -> model input dict.
        total_batch_size: SOLVER.IMS_PER_BATCH (all ranks together).
        seed: data seed, the same on every rank (None: ``comm.shared_random_seed()``).
        aspect_ratio_grouping: group global batches by landscape / portrait (dicts' "width" and "height").
        num_workers: DataLoader worker processes (the result does not depend on it).
        ignore_signals: signal numbers the workers ignore (the preemption signals, which the trainer handles).
    """

    def __init__(self, dataset: List[Dict], mapper, total_batch_size: int, *, seed: Optional[int] = None,
                 aspect_ratio_grouping: bool = True, num_workers: int = 0, shuffle: bool = True,
                 ignore_signals: Sequence[int] = ()):
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % self.world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive multiple of the "
                             f"number of processes ({self.world_size})")
        if not len(dataset):
            raise ValueError("the training dataset (DATASETS.TRAIN) is empty")
        self.size, self.total_batch_size, self.shuffle = len(dataset), int(total_batch_size), bool(shuffle)
        self.group_ids = None
        if aspect_ratio_grouping:
            self.group_ids = np.array([0 if w > h else 1 for w, h in map(_image_size, dataset)], dtype=np.uint8)
        self.dataset = _SeededMapDataset(DatasetFromList(dataset, copy=False), mapper, self._seed_sequence)
        self.num_workers = int(num_workers)
        self.ignore_signals = tuple(int(x) for x in ignore_signals)
        seed = comm.shared_random_seed() if seed is None else int(seed)
        self._state = {"seed": seed, "position": 0, "buckets": [[], []]}

    def _seed_sequence(self, position, index):
        return sample_seed(self._state["seed"], position, index)

    @property
    def seed(self) -> int:
        return self._state["seed"]

    def state_dict(self) -> Dict:
        """Where the next batch starts: data seed, stream position, aspect-ratio buckets, and the geometry
        it was made with (batch size, processes, dataset size, grouping)."""
        return {"seed": self._state["seed"], "position": self._state["position"],
                "buckets": [list(map(list, b)) for b in self._state["buckets"]],
                "total_batch_size": self.total_batch_size, "world_size": self.world_size,
                "dataset_size": self.size, "aspect_ratio_grouping": self.group_ids is not None}

    def load_state_dict(self, state: Dict) -> None:
        """Continue from `state` (a :meth:`state_dict`); warns about what differs from the saved run."""
        changes = []
        if state["total_batch_size"] != self.total_batch_size:
            changes.append(f"SOLVER.IMS_PER_BATCH {state['total_batch_size']} -> {self.total_batch_size}: "
                           "iterations from now on group the images differently")
        if state["dataset_size"] != self.size:
            changes.append(f"the training set has {self.size} images, the checkpoint's {state['dataset_size']}: "
                           "the data order is another one from here on")
        if state["aspect_ratio_grouping"] != (self.group_ids is not None):
            changes.append("DATALOADER.ASPECT_RATIO_GROUPING changed: batches are grouped differently")
        if state["world_size"] != self.world_size:
            changes.append(f"{state['world_size']} -> {self.world_size} processes: each iteration trains on the "
                           "same images with the same augmentations, split differently among the processes "
                           "(results differ by floating-point rounding)")
        if changes:
            logger.warning("Resuming the training data order with changes (not exactly the interrupted run): "
                           + "; ".join(changes))
        self._state = {"seed": int(state["seed"]), "position": int(state["position"]),
                       "buckets": [[tuple(e) for e in b] for b in state["buckets"]]}
        logger.info(f"Training data resumes at stream position {self._state['position']} (epoch "
                    f"{self._state['position'] // self.size}) with data seed {self._state['seed']}")

    def __iter__(self):
        sampler = _BatchSampler(self)
        generator = torch.Generator()  # worker base seeds; never draws from the global generator
        generator.manual_seed(self._state["seed"])
        init = functools.partial(ignore_signals, self.ignore_signals) if self.ignore_signals else None
        loader = torchdata.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                      collate_fn=_as_list, generator=generator, worker_init_fn=init)
        batches = iter(loader)
        _LIVE_ITERATORS.add(batches)
        for batch in batches:
            self._state = dict(self._state, **sampler.states.popleft())
            yield batch
