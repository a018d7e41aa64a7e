"""Image files decoded to the right levels in every mode Pillow reads, and in bounded memory."""
from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gfnet_edge.data.images import load_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def grey(tmp_path):
    g8 = np.random.default_rng(0).integers(0, 256, (240, 250), dtype=np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    return g8, load_images(tmp_path / "g8.png", 224, 0.875)[0]


@pytest.mark.parametrize("name,write", [
    ("g16.png", lambda p, g: Image.fromarray(g.astype(np.uint16) * 257).save(p)),
    ("g16.tif", lambda p, g: Image.fromarray(g.astype(np.uint16) * 257).save(p)),
    ("gf.tif", lambda p, g: Image.fromarray(g.astype(np.float32) / 255, mode="F").save(p)),
    ("g16.pgm", lambda p, g: p.write_bytes(b"P5\n250 240\n65535\n" + (g.astype(">u2") * 257).tobytes())),
    ("la.png", lambda p, g: Image.fromarray(np.stack([g, g], -1), mode="LA").save(p)),
    ("rgba.png", lambda p, g: Image.fromarray(np.stack([g, g, g, 255 - g], -1), mode="RGBA").save(p)),
    ("p.gif", lambda p, g: Image.fromarray(g).convert("P").save(p)),
])
def test_high_bit_depth_and_other_modes_give_the_8_bit_levels(tmp_path, grey, name, write):
    """The same picture stored as 16-bit, float, grey+alpha, RGBA or palette gives the 8-bit
    frames (Pillow's own convert('RGB') clips 16-bit levels and truncates floats to 0)."""
    write(tmp_path / name, grey[0])
    frames = load_images(tmp_path / name, 224, 0.875)[0]
    assert np.array_equal(frames, grey[1])


def _long_png(path: Path, w: int, h: int) -> Path:
    raw = (b"\x00" + b"\xff" * ((w + 7) // 8)) * h

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return path


def test_long_image_of_a_few_kb_is_read_in_bounded_memory(tmp_path):
    """A 30 M x 1 pixel PNG (a few kB): resizing its short side to 256 would take 23 GB; only the
    centre crop is resampled, under a 600 MB address-space ceiling on top of the imports."""
    png = _long_png(tmp_path / "long.png", 30_000_000, 1)
    assert png.stat().st_size < 64 * 1024
    code = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from gfnet_edge.data.images import load_images
vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize:')][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (600 << 20),) * 2)
frames = load_images({str(png)!r}, 224, 0.875)[0]
assert frames.shape == (1, 224, 224, 3) and (frames == 255).all(), frames.mean()
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
