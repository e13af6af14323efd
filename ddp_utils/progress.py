"""A tqdm progress bar on the main process only (loss, images/s)."""

from __future__ import annotations

from accelerate import Accelerator
from tqdm.auto import tqdm


class Progress:
    def __init__(self, accelerator: Accelerator, start: int, total: int) -> None:
        self.bar = (
            tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
            if accelerator.is_main_process
            else None
        )
        self.step = start

    def update(self, step: int, **values: float) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.step)
        self.step = step
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
