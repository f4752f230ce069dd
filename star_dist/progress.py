"""The driver's progress bar: bytes written (with ETA) and tensors done, or silence."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """Counts output bytes and tensors; draws a tqdm bar on stderr unless quiet."""

    def __init__(self, total_bytes: int, total_tensors: int, quiet: bool, desc: str = "merging") -> None:
        self.total_tensors = total_tensors
        self.tensors = 0
        self._bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=quiet,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def advance(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self._bar.set_postfix_str(f"tensors {self.tensors}/{self.total_tensors}", refresh=False)
        self._bar.update(nbytes)

    def message(self, text: str) -> None:
        if not self._bar.disable:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
