"""File names of a run's per-entry files (saved examples, their grids): one safe, short, stable name per
entry label. Plain strings, so that the report can name the files without importing torch."""

from __future__ import annotations

import hashlib

# File systems allow 255 bytes a name: a stem leaves room for -N, .npz or .png and the temporary
# name an atomic write uses beside the file (a dot before, a dot and 8 characters after).
MAX_STEM_BYTES = 100
HASH_CHARS = 12


def entry_label(display_name: str, eps_text: str) -> str:
    """What an entry's file is named after: the suite label and its eps (or pixel count) as written."""
    return f"{display_name}@{eps_text}" if eps_text else display_name


def file_stem(entry: str) -> str:
    """The entry's label made filesystem-safe (``pgd@8/255`` -> ``pgd_8_255``) and short enough for a file name.

    A stem over ``MAX_STEM_BYTES`` keeps its readable start and ends in a hash of the whole label: distinct
    labels keep distinct names, and a label always gets the same name (a resumed run writes the same files).
    """
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry).strip(".") or "entry"
    raw = stem.encode("utf-8")
    if len(raw) <= MAX_STEM_BYTES:
        return stem
    digest = hashlib.sha256(entry.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    # Cut on a byte boundary, dropping a character split in two.
    prefix = raw[:MAX_STEM_BYTES - HASH_CHARS - 1].decode("utf-8", "ignore")
    return f"{prefix}-{digest}"


def unique_stems(entries: list[str]) -> list[str]:
    """One file name per entry; labels that clean to the same name get -2, -3, ..."""
    taken: set[str] = set()
    stems = []
    for entry in entries:
        stem, n = file_stem(entry), 2
        while stem in taken:
            stem = f"{file_stem(entry)}-{n}"
            n += 1
        taken.add(stem)
        stems.append(stem)
    return stems
