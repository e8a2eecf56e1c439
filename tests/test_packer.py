"""The projector's RESP packer: the same bytes as redis-py's own, made piece by piece."""

from __future__ import annotations

import random

import pytest
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer

from projector.sink import Later, RespPacker

_encode = Encoder("utf-8", "strict", False).encode  # type: ignore[no-untyped-call]


def _reference(*args: object) -> bytes:
    """redis-py's pure-Python packer, the reference for what the server must receive."""
    return b"".join(PythonRespSerializer(6000, _encode).pack(*args))


def _made(args: list[object]) -> list[object]:
    return [a.make() if isinstance(a, Later) else a for a in args]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_packs_the_same_bytes_as_redis_py(seed: int) -> None:
    rng = random.Random(seed)
    args: list[object] = ["EVALSHA", "f" * 40, 2, "k1", "k2"]
    for _ in range(2000):
        size = rng.choice([0, 1, 50, 4_600, 70_000, 200_000])  # around and above a chunk
        kind = rng.randrange(4)
        if kind == 0:
            args.append(rng.randrange(-(10**12), 10**12))
        elif kind == 1:
            args.append("é" * (size // 2))
        elif kind == 2:
            args.append(rng.randbytes(size))
        else:
            blob = rng.randbytes(size)
            args.append(Later(lambda blob=blob: blob))
    packed = list(RespPacker(_encode).pack(*args))
    assert b"".join(packed) == _reference(*_made(args))
    assert max(len(p) for p in packed) <= 200_000 + 2 * RespPacker.CHUNK


def test_a_command_name_with_a_space_is_several_arguments() -> None:
    for name in ("CONFIG GET", b"CONFIG GET"):
        assert b"".join(RespPacker(_encode).pack(name, "maxmemory")) == _reference(
            "CONFIG GET", "maxmemory"
        )


def test_later_arguments_are_made_only_as_the_pieces_are_taken() -> None:
    made: list[int] = []

    def doc(i: int) -> bytes:
        made.append(i)
        return bytes(4_600)

    args = ["EVALSHA", "f" * 40, 0, *(Later(lambda i=i: doc(i)) for i in range(1_000))]
    pieces = RespPacker(_encode).pack(*args)
    first = next(pieces)
    # One 64 KB piece holds about 14 documents of 4.6 KB: the rest are not made yet.
    assert 0 < len(made) < 20, len(made)
    rest = list(pieces)
    assert made == list(range(1_000))
    assert b"".join([first, *rest]) == _reference(*_made(args))
