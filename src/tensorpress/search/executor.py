"""Where fitness evaluations run: in this process, or in Ray actors.

Both executors hand out candidates in the same order and every candidate's score is computed
the same way (one call per window, the same parent states), so a search gives the same result
in-process, on one Ray worker or on many. With Ray, the evaluator's pieces (model, every level's
weights as numpy arrays, reference log-probabilities) are put into the object store once; the
workers map the arrays without copies, and only candidates, scores and a new parent's hidden
states travel afterwards.

``ray.init()`` is called the way a user on one machine expects: a local instance started in
this process, no daemon to set up, as many workers as cores and the object store sized by Ray
for this machine's memory; ``address`` joins an existing cluster instead.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tensorpress.errors import MissingDependencyError, SearchError
from tensorpress.search.fitness import Choice, Evaluator, Pieces

log = logging.getLogger(__name__)


class LocalExecutor:
    """Every evaluation in this process (torch uses this process's threads)."""

    kind = "in-process"

    def __init__(self, pieces: Pieces) -> None:
        self.evaluator = Evaluator(pieces)
        self.workers = 1

    @property
    def pool(self) -> int:
        return self.evaluator.pool

    def score(self, choices: list[Choice], windows: list[int], keep: bool = False) -> list[list[float]]:
        return [self.evaluator.score(c, windows, keep) for c in choices]

    def adopt(self, choice: Choice) -> None:
        self.evaluator.adopt(choice)

    def close(self) -> None:
        pass


class _Worker:
    """A Ray actor holding one evaluator (one CPU, one torch thread)."""

    def __init__(self, pieces: Pieces) -> None:
        import torch

        torch.set_num_threads(1)
        self.evaluator = Evaluator(pieces)

    def score(self, choice: Choice, windows: list[int], keep: bool) -> list[float]:
        return self.evaluator.score(choice, windows, keep)

    def take(self, choice: Choice) -> Any:
        return self.evaluator.take(choice)

    def adopt(self, choice: Choice, kept: Any = None) -> None:
        self.evaluator.adopt(choice, kept)


def _ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("Ray is not installed: pip install 'ray>=2.40' (or tensorpress[search]), "
                                     "or run the search in-process (--workers 0)") from None
    return ray


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class RayExecutor:
    """Evaluations as Ray actor calls, candidates dealt round-robin to ``workers`` actors."""

    kind = "ray"

    def __init__(self, pieces: Pieces, workers: int, address: str | None = None) -> None:
        ray = _ray()
        if workers < 1:
            raise SearchError(f"workers must be at least 1 for Ray, got {workers}")
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                kwargs["num_cpus"] = max(workers, os.cpu_count() or 1)
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise SearchError(f"cannot start or join Ray at {address or 'a local instance'}: {exc}") from None
            self.started = True
        log.info("Ray: %d workers on %s", workers, address or "a local instance")
        self.ray = ray
        ref = ray.put(pieces)
        actor = ray.remote(num_cpus=1)(_Worker)
        self.actors = [actor.remote(ref) for _ in range(workers)]
        self.workers = workers
        self._pool = len(pieces.calls)
        self._owner: dict[Choice, int] = {}

    @property
    def pool(self) -> int:
        return self._pool

    def score(self, choices: list[Choice], windows: list[int], keep: bool = False) -> list[list[float]]:
        n = len(self.actors)
        futures = [self.actors[i % n].score.remote(tuple(c), windows, keep) for i, c in enumerate(choices)]
        results = self.ray.get(futures)
        if keep:  # each actor keeps its best; the owner of a choice is the actor that scored it
            self._owner = {tuple(c): i % n for i, c in enumerate(choices)}
        return results

    def adopt(self, choice: Choice) -> None:
        choice = tuple(choice)
        owner = self.actors[self._owner[choice]]
        kept = owner.take.remote(choice)
        self.ray.get([a.adopt.remote(choice, None if a is owner else kept) for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()


def make_executor(pieces: Pieces, workers: int | None, address: str | None = None):
    """``workers`` = 0: in-process; None: Ray with one worker per core when Ray is installed
    (in-process otherwise, and the log says so); n >= 1: Ray with n workers."""
    if workers == 0:
        return LocalExecutor(pieces)
    if workers is None:
        if not ray_available():
            log.warning("Ray is not installed: the search runs in-process (same results; pip install 'ray>=2.40' "
                        "to spread evaluations over workers)")
            return LocalExecutor(pieces)
        workers = os.cpu_count() or 1
    return RayExecutor(pieces, workers, address)
