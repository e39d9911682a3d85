"""Data attribution for text-to-image diffusion models.

Importing the package quiets two third-party messages that every run would otherwise print, so a
newcomer's log shows only what matters. Each is filtered by its exact text on the one logger that
emits it; every other message of those libraries (warnings included) still comes through.

* diffusers: "Cannot initialize model with low cpu memory usage because `accelerate` was not found"
  on every model load. The project loads small local models without accelerate on purpose; diffusers
  then falls back to ordinary loading, which is what we want, so the advice is noise.
* PyTorch Lightning: "Tip: For seamless cloud logging ... litlogger" on every Trainer (an
  advertisement logged with rank_zero_info, not a diagnosis).
"""

from __future__ import annotations

import logging


class _DropMessages(logging.Filter):
    """Drops the records whose message contains one of `fragments`; passes everything else."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(fragment in message for fragment in self.fragments)


# The loggers that print the accelerate advice (diffusers.utils.logging.get_logger(__name__) in each
# module). Logger filters see only records created on that logger, hence one per module.
_ACCELERATE_FILTER = _DropMessages("because `accelerate` was not found")
_ACCELERATE_LOGGERS = (
    "diffusers.models.modeling_utils",
    "diffusers.pipelines.pipeline_utils",
    "diffusers.loaders.unet",
    "diffusers.loaders.ip_adapter",
    "diffusers.loaders.transformer_sd3",
    "diffusers.loaders.transformer_flux",
)
# lightning_utilities' rank_zero_info logs through the logger that pytorch_lightning (or lightning_fabric,
# or the unified `lightning` package), whichever was imported last, installed as its `log`.
_LITLOGGER_FILTER = _DropMessages("litlogger")
_RANK_ZERO_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)


def _install_log_filters() -> None:
    for name in _ACCELERATE_LOGGERS:
        logger = logging.getLogger(name)
        if _ACCELERATE_FILTER not in logger.filters:
            logger.addFilter(_ACCELERATE_FILTER)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _LITLOGGER_FILTER not in logger.filters:
            logger.addFilter(_LITLOGGER_FILTER)


_install_log_filters()
