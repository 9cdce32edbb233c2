"""Progress on a terminal (tqdm: phase, amount done, rate, ETA); silent otherwise."""

import sys

from tqdm import tqdm


class Progress:
    """Told a total, then every amount just done; a tqdm bar when stderr is a terminal."""

    def __init__(self, description: str = "", *, unit: str = "B", enabled: bool | None = None):
        self.description, self.unit = description, unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = 0
        self._bar: tqdm | None = None

    def start(self, total: int | None) -> None:
        """Show the bar; `total` None while it is not known yet (`restart` sets it)."""
        self.total = total or 0
        if self.enabled:
            scale = self.unit == "B"
            self._bar = tqdm(
                total=total, desc=self.description, unit=self.unit, unit_scale=scale, leave=False
            )

    def __call__(self, amount: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(amount)

    def restart(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.reset(total=total)

    def phase(self, description: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(description)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
