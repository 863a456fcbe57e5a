"""The `synthetic` source: the built-in generator (clip.synthetic), the embedded default."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from clip import synthetic
from clip.collect.sources.base import Candidate, CandidateSource, Partition
from clip.config import SyntheticSourceConfig


class SyntheticSource(CandidateSource):
    """The built-in generator; candidate i is scene i of the training stream for `seed`."""

    name = "synthetic"

    def __init__(self, cfg: SyntheticSourceConfig, partition_size: int, seed: int) -> None:
        self.cfg = cfg
        self.partition_size = partition_size
        self.seed = seed

    def partitions(self) -> list[Partition]:
        n = self.cfg.num_samples
        return [
            Partition(i, ("synthetic", start, min(n, start + self.partition_size)))
            for i, start in enumerate(range(0, n, self.partition_size))
        ]

    def _candidate(self, index: int, with_images: bool) -> Candidate:
        scene = synthetic.make_scene(self.seed, index, heldout_fraction=self.cfg.heldout_fraction)
        image = synthetic.render_scene(scene, self.cfg.image_size) if with_images else None
        return Candidate(str(index), scene.caption, f"synthetic://{self.seed}/{index}", image)

    def iter_candidates(self, part: Partition, with_images: bool = False) -> Iterator[Candidate]:
        _, start, stop = part.spec
        for index in range(start, stop):
            yield self._candidate(index, with_images)

    def load_images(self, part: Partition, rows: Sequence[int]) -> dict[int, Candidate]:
        start = part.spec[1]
        return {row: self._candidate(start + row, True) for row in rows}

    def vocabulary(self) -> list[str]:
        return synthetic.vocabulary(self.cfg.heldout_fraction)
