"""`pneumo rle-decode` and `pneumo rle-encode` (placeholder while being written)."""


def rle_decode() -> None:
    """Decode a SIIM RLE CSV into one mask PNG per ImageId."""
    raise NotImplementedError


def rle_encode() -> None:
    """Encode a folder of mask PNGs into a SIIM RLE CSV."""
    raise NotImplementedError
