"""The frames HTTP workers and an engine process exchange over a Unix socket.

Every frame is a fixed header ``(body bytes, kind, request id, count)`` and a body. Pairs travel as numpy
arrays, not Python objects: ``count`` int32 lengths, then every pair's token ids (int32) and type ids (int8)
back to back. 64 pairs of 256 tokens are 80 KiB and cost the engine two ``frombuffer`` calls, where a pickled
list of lists would cost it thousands of Python objects built under the GIL it needs for the forward pass.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from app.engine.base import EncodedPair

HEADER = struct.Struct("<IBQI")  # body length, kind, request id, count
MAX_BODY_BYTES = 1 << 30  # a frame claiming more is a protocol error, not a reason to allocate


class Kind(IntEnum):
    # worker → engine
    HELLO = 1  # body: nothing; answered with HELLO_OK and the engine's facts (JSON)
    SCORE = 2  # body: pairs (encode_pairs); answered with SCORES or an error frame
    CANCEL = 3  # the client of that request left: drop its pairs that have not run
    HEALTH = 4  # answered with HEALTH_OK or HEALTH_FAILED
    # engine → worker
    HELLO_OK = 10  # body: JSON
    SCORES = 11  # body: float64 logits, in the order of the request's pairs
    FAILED = 12  # body: UTF-8 message; the model failed while scoring (a server fault)
    NOT_READY = 13  # body: UTF-8 message; the engine is stopping
    OVERLOADED = 14  # body: UTF-8 message; the engine's queue is full
    HEALTH_OK = 15
    HEALTH_FAILED = 16  # body: UTF-8 reason (for the log only)


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    request_id: int
    count: int
    body: bytes


def pack(kind: Kind, request_id: int = 0, count: int = 0, body: bytes = b"") -> bytes:
    return HEADER.pack(len(body), kind, request_id, count) + body


def pack_json(kind: Kind, request_id: int, payload: dict[str, Any]) -> bytes:
    return pack(kind, request_id, body=json.dumps(payload).encode())


PackedPairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # lengths (int32), ids (int32), types (int8)


def pack_pairs(pairs: Sequence[EncodedPair]) -> PackedPairs:
    lengths = np.fromiter((len(pair) for pair in pairs), dtype=np.int32, count=len(pairs))
    total = int(lengths.sum())
    chain = itertools.chain.from_iterable
    ids = np.fromiter(chain(pair.input_ids for pair in pairs), dtype=np.int32, count=total)
    types = np.fromiter(chain(pair.type_ids for pair in pairs), dtype=np.int8, count=total)
    return lengths, ids, types


def join_packed(parts: Sequence[PackedPairs]) -> bytes:
    """One SCORE body from parts packed separately (in order)."""
    return b"".join(np.concatenate([part[column] for part in parts]).tobytes() for column in range(3))


def encode_pairs(pairs: Sequence[EncodedPair]) -> bytes:
    return join_packed([pack_pairs(pairs)])


def decode_pairs(body: bytes, count: int) -> list[EncodedPair]:
    """Pairs whose ids are numpy views of ``body`` (backends copy rows with numpy slicing, so no lists are built)."""
    lengths = np.frombuffer(body, dtype=np.int32, count=count)
    total = int(lengths.sum())
    ids = np.frombuffer(body, dtype=np.int32, count=total, offset=4 * count)
    types = np.frombuffer(body, dtype=np.int8, count=total, offset=4 * count + 4 * total)
    if 4 * count + 5 * total != len(body):
        raise ValueError(f"a SCORE frame of {len(body)} bytes does not hold {count} pairs of {total} tokens")
    bounds = np.concatenate(([0], np.cumsum(lengths))).tolist()
    # Views, typed as lists for the Backend protocol: a backend only takes len() and row slices of them.
    return [
        EncodedPair(ids[start:stop], types[start:stop])  # type: ignore[arg-type]
        for start, stop in itertools.pairwise(bounds)
    ]


def encode_scores(scores: Sequence[float]) -> bytes:
    return np.asarray(scores, dtype=np.float64).tobytes()


def decode_scores(body: bytes, count: int) -> list[float]:
    values: list[float] = np.frombuffer(body, dtype=np.float64, count=count).tolist()
    return values


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """The next frame; raises ``asyncio.IncompleteReadError`` when the peer closed the connection."""
    header = await reader.readexactly(HEADER.size)
    length, kind, request_id, count = HEADER.unpack(header)
    if length > MAX_BODY_BYTES:
        raise ValueError(f"frame of {length} bytes announced: not this protocol")
    body = await reader.readexactly(length) if length else b""
    return Frame(Kind(kind), request_id, count, body)
