"""A simulated accelerator: makes the serving problem of a GPU reproducible on a machine without one.

An eager forward pass on a GPU is hundreds of kernel launches. Each launch is a little Python and C++ run under
the GIL, and torch's op bindings release the GIL around each dispatch, so every launch must take the GIL back;
the device then runs the batch while the host waits (``.cpu()``, GIL released). In a process whose other
threads parse JSON and build responses, each re-take can wait a whole switch interval (5 ms), and the device
idles while the launches crawl: the field finding of "forward thread busy 98 %, a tenth of the engine's rate".

:class:`SimulatedDevice` reproduces exactly that cost structure, with no torch:

- ``launches`` steps that each hold the GIL for ``launch_us`` (a C call made without releasing it: the GIL is
  taken as a launch takes it, without burning a core, so the proof does not depend on how many cores a shared
  test machine has free), each followed by a GIL release and re-take (``time.sleep(0)``);
- device time proportional to the padded tokens of the batch (``token_us`` per token), which overlaps the
  launches as a GPU's queue does: a batch takes ``max(launch time, device time)`` when nothing competes.

Its capacity (pairs/s with nothing else in the process) is what ``forward`` achieves back to back; the service
is judged against it. Logits are a deterministic function of each pair alone, so batching never changes them.
Select it with ``RERANKER_BACKEND=simulated`` (tests and ``bench/``; never for real traffic).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence

import numpy as np

from app.config import Settings, model_dir_problem
from app.engine.base import EncodedPair, padded_tokens
from app.engine.model_dir import load_pair_encoder

# libc through ctypes.PyDLL: its calls keep the GIL (ctypes.CDLL would release it).
_LIBC_WITH_GIL = ctypes.PyDLL(None)
_LIBC_WITH_GIL.usleep.argtypes = [ctypes.c_uint]


def hold_gil_for(seconds: float) -> None:
    """Keep the GIL for ``seconds`` without using the CPU: no other thread of this process runs meanwhile."""
    _LIBC_WITH_GIL.usleep(max(1, round(seconds * 1e6)))


class SimulatedDevice:
    def __init__(self, settings: Settings) -> None:
        self.model_path = settings.model_directory
        self.encoder = load_pair_encoder(settings)  # exactly what an HTTP worker encodes with
        self.token_s = settings.simulated_token_us * 1e-6
        self.launches = settings.simulated_launches
        self.launch_s = settings.simulated_launch_us * 1e-6
        self.forward_calls = 0

    def device_seconds(self, pairs: int, longest: int) -> float:
        return self.token_s * pairs * longest

    def batch_tokens(self, pairs: int, longest: int, total: int) -> int:
        return padded_tokens(pairs, longest, total)  # no fixed shapes: a batch runs at its own size

    def forward(self, pairs: Sequence[EncodedPair]) -> list[float]:
        started = time.perf_counter()
        device_done = started + self.device_seconds(len(pairs), max(len(pair) for pair in pairs))
        for _ in range(self.launches):
            hold_gil_for(self.launch_s)
            time.sleep(0)  # the binding releases the GIL around the dispatch and must take it back
        self.forward_calls += 1
        logits = [self.logit(pair) for pair in pairs]
        remaining = device_done - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)  # the device runs the batch; the host waits with the GIL released
        return logits

    @staticmethod
    def logit(pair: EncodedPair) -> float:
        ids = np.asarray(pair.input_ids, dtype=np.int64)
        weights = np.arange(1, len(ids) + 1, dtype=np.int64)
        return float(int((ids * weights).sum()) % 4001) / 500.0 - 4.0

    def warm_up(self) -> None:
        self.forward(self.encoder.encode("warm up", ["the simulated device"]).pairs)

    def check(self) -> None:
        problem = model_dir_problem(self.model_path)
        if problem:
            raise RuntimeError(problem)

    def describe(self) -> dict[str, str]:
        return {
            "device": "simulated",
            "dtype": "float32",
            "token_us": str(self.token_s * 1e6),
            "launches": str(self.launches),
            "launch_us": str(self.launch_s * 1e6),
            "max_length": str(self.encoder.max_length),
        }
