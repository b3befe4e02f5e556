"""When a photo was taken: its EXIF DateTimeOriginal (else DateTimeDigitized), else its XMP
DateTimeOriginal/CreateDate, else the file's modification time. (EXIF's DateTime is when the
file was last changed, not taken: never used.)

Read from the header only (no pixels decoded), for the ``{taken:...}`` field of output name
templates (``watcher.fs.template``). Times are the camera's wall clock, as EXIF stores them;
the file time is in local time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import datetime

from watcher.imaging.pil import Image, register_external

EXIF_IFD = 0x8769
DATE_TIME_ORIGINAL, DATE_TIME_DIGITIZED = 0x9003, 0x9004
_XMP = re.compile(rb'(?:exif:DateTimeOriginal|xmp:CreateDate|photoshop:DateCreated)'
                  rb'(?:="|>)(\d{4})-(\d\d)-(\d\d)(?:T(\d\d):(\d\d)(?::(\d\d))?)?')


def parse_exif_time(value: object) -> datetime | None:
    """``YYYY:MM:DD HH:MM:SS`` (EXIF's form), or None for anything else (blank, zeros)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    m = re.match(r"\s*(\d{4})[:-](\d\d)[:-](\d\d)[ T](\d\d):(\d\d):(\d\d)", value)
    if not m:
        return None
    try:
        return datetime(*map(int, m.groups()))
    except ValueError:
        return None


def from_exif(data: bytes) -> datetime | None:
    exif = Image.Exif()
    exif.load(data)
    sub = exif.get_ifd(EXIF_IFD)
    for value in (sub.get(DATE_TIME_ORIGINAL), sub.get(DATE_TIME_DIGITIZED)):
        when = parse_exif_time(value)
        if when is not None:
            return when
    return None


def from_xmp(data: bytes) -> datetime | None:
    m = _XMP.search(data)
    if not m:
        return None
    try:
        return datetime(*(int(g or 0) for g in m.groups()))
    except ValueError:
        return None


def capture_time(path: str, allowed: Sequence[str]) -> datetime:
    """When the image at ``path`` was taken (see the module's docstring)."""
    try:
        register_external(tuple(allowed))
        with Image.open(path, formats=list(allowed)) as im:
            exif = im.info.get("exif")
            when = from_exif(exif) if isinstance(exif, bytes) and exif else None
            xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
            if when is None and xmp:
                when = from_xmp(xmp.encode() if isinstance(xmp, str) else xmp)
            if when is not None:
                return when
    except Exception:  # noqa: BLE001, S110 - unreadable metadata: the file's time says it
        pass
    return datetime.fromtimestamp(os.stat(path).st_mtime)
