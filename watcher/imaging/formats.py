"""Output format names (placeholder until the formats table lands)."""

OUTPUT_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "avif": "AVIF", "bmp": "BMP",
                  "tiff": "TIFF", "gif": "GIF"}
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")
