"""Write a real ICC v2 matrix/TRC RGB profile (enough for LittleCMS) for colour tests.

No wide-gamut profile ships on these machines, so the tests make one: Display P3 primaries
(D50-adapted colorants as in Apple's profile) with a 2.2 gamma curve.
"""

from __future__ import annotations

import struct

D50 = (0.9642, 1.0, 0.8249)
DISPLAY_P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(xyz: tuple[float, float, float]) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15(v) for v in xyz)


def _curve(gamma: float) -> bytes:
    return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"


def _desc(text: str) -> bytes:
    a = text.encode("ascii") + b"\0"
    return (b"desc" + b"\0" * 4 + struct.pack(">I", len(a)) + a + struct.pack(">II", 0, 0)
            + struct.pack(">HB", 0, 0) + b"\0" * 67)


def _text(text: str) -> bytes:
    return b"text" + b"\0" * 4 + text.encode("ascii") + b"\0"


def rgb_profile(description: str = "Display P3 (test)",
                colorants: tuple = DISPLAY_P3, gamma: float = 2.2) -> bytes:
    tags = [(b"desc", _desc(description)), (b"cprt", _text("public domain test profile")),
            (b"wtpt", _xyz(D50)), (b"rXYZ", _xyz(colorants[0])), (b"gXYZ", _xyz(colorants[1])),
            (b"bXYZ", _xyz(colorants[2])), (b"rTRC", _curve(gamma)), (b"gTRC", _curve(gamma)),
            (b"bTRC", _curve(gamma))]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table, data = [struct.pack(">I", len(tags))], []
    for sig, body in tags:
        while offset % 4:
            offset += 1
            data.append(b"\0")
        table.append(sig + struct.pack(">II", offset, len(body)))
        data.append(body)
        offset += len(body)
    body = b"".join(table) + b"".join(data)
    size = 128 + len(body)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr"
              + b"RGB " + b"XYZ " + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"APPL"
              + b"\0" * 4 + b"\0" * 4 + b"\0" * 4 + b"\0" * 8 + struct.pack(">I", 0)
              + b"".join(_s15(v) for v in D50) + b"lcms" + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128
    return header + body
