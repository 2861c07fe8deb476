"""Thumbnails of indexed images for the search page: made fast, kept in a bounded cache.

A 24-megapixel JPEG costs ~0.3 s to decode in full; decoded at a reduced scale
(:meth:`PIL.Image.Image.draft`, at least the thumbnail's size) and shrunk with
:meth:`~PIL.Image.Image.thumbnail` (which reduces by whole factors before resampling), a 160 px
thumbnail costs a few milliseconds. The encoded bytes are then kept in a :class:`ByteLRU`, so a
page of results asked for again is served from memory.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Hashable

from PIL import Image

#: Bytes of encoded images the server keeps by default.
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class ByteLRU:
    """A thread-safe least-recently-used cache of byte strings bounded by their total size.

    Written here because :func:`functools.lru_cache` bounds the number of entries, not their
    bytes, and cannot be asked whether a key is present.

    Args:
        max_bytes: total size kept; an entry larger than an eighth of it is not kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            data = self._entries.get(key)
            if data is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.max_bytes // 8:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._entries[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._size -= len(dropped)

    def discard(self, match) -> None:
        """Drop every entry whose key satisfies ``match(key)``."""
        with self._lock:
            for key in [k for k in self._entries if match(k)]:
                self._size -= len(self._entries.pop(key))

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._entries)


def encode_png(pil: Image.Image, size: int | None) -> bytes:
    """``pil`` as PNG bytes; with ``size``, fitted into ``size x size``: large images shrunk
    (reduce, then Lanczos), small ones (28 px) enlarged with hard pixel edges."""
    if size is not None:
        if max(pil.size) > size:
            pil.thumbnail((size, size), Image.LANCZOS, reducing_gap=2.0)
        elif max(pil.size) < size:
            scale = size / max(pil.size)
            pil = pil.resize(
                (max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.NEAREST
            )
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1 if size is None else 6)
    return buf.getvalue()
