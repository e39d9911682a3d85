"""Checks an attribution run makes before any work: the method's settings are of the right types and
ranges, the data is the model's training data (same kind, same examples, same exclusions), the model's
tokenizer knows the data's words, and the run directory belongs to this configuration."""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_attribution.data.base import DataError, parse_id_list
from diffusion_attribution.models.pipeline import CONFIG_FILE, TextToImageModel
from diffusion_attribution.models.tokenizer import caption_words, is_word_level
from diffusion_attribution.utils.fingerprint import hash_json

log = logging.getLogger(__name__)

# Data settings that only change how examples are loaded, not which examples there are.
LOADER_ONLY_DATA_KEYS = frozenset(
    {"batch_size", "num_workers", "cache_dir", "cache_images", "sample_prompts", "random_flip", "exclude"}
)
RUN_STAMP = "attribution_run.json"


class VocabularyMismatchError(ValueError):
    pass


class TrainingDataMismatchError(ValueError):
    pass


# ------------------------------------------------------------------------------- method settings
# Hydra hands the constructors whatever the command line said (`method.num_timesteps=-1`,
# `method.flips=[maybe]`): each setting is checked for its type and range here, so that a bad one is
# refused by name before any work instead of becoming a silently different run.
def _plain(value: Any) -> Any:
    return (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    )


def _as_int(value: Any) -> int | None:
    """`value` as an int when it is one (an integral float such as 1e3 too); None otherwise."""
    if isinstance(value, bool):  # True is an int to Python, not a count to anyone
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def int_setting(key: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer setting in [minimum, maximum]; the error names the key and the range."""
    number = _as_int(value)
    if number is None or number < minimum or (maximum is not None and number > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise ValueError(f"{key} must be an integer of at least {minimum}{upper}, got {value!r}.")
    return number


def float_setting(key: str, value: Any, what: str = "a positive finite number", hint: str = ".") -> float:
    """A positive, finite number."""
    number = None if isinstance(value, (bool, str)) else value
    try:
        number = float(number)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or not number > 0:
        raise ValueError(f"{key} must be {what}, got {value!r}{hint}")
    return number


def bool_setting(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}.")
    return value


def timesteps_setting(key: str, value: Any) -> list[int] | None:
    """null, or a non-empty list of integer timesteps >= 0 (the upper bound is the model's scheduler's,
    checked by `check_timesteps` once the model is known)."""
    value = _plain(value)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(
            f"{key} must be null (method.num_timesteps evenly spaced) or a non-empty list of integer "
            f"timesteps >= 0, e.g. {key}='[0,500]', got {value!r}."
        )
    steps = [_as_int(t) for t in value]
    bad = [t for t, s in zip(value, steps, strict=True) if s is None or s < 0]
    if bad:
        raise ValueError(f"{key} must list integer timesteps >= 0; {bad} are not.")
    return [int(s) for s in steps]  # type: ignore[arg-type]


def captions_setting(key: str, value: Any) -> str | int | list[int]:
    """ "all", a positive count, or a non-empty list of caption indices (integers >= 0)."""
    value = _plain(value)
    if value == "all":
        return "all"
    count = _as_int(value)
    if count is not None and count >= 1:
        return count
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0:
        indices = [_as_int(c) for c in value]
        if all(i is not None and i >= 0 for i in indices):
            return [int(i) for i in indices]  # type: ignore[arg-type]
    raise ValueError(
        f"{key} must be all, a positive count of captions per image (e.g. 1) or a non-empty list of caption "
        f"indices >= 0 (e.g. '[0,2]'), got {value!r}."
    )


def flips_setting(key: str, value: Any) -> str | list[bool]:
    """ "auto" or a non-empty list of real booleans (a string such as "maybe" or "yes" is refused: Python's
    bool() would read it as True)."""
    value = _plain(value)
    if value == "auto":
        return "auto"
    if (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and len(value) > 0
        and all(isinstance(f, bool) for f in value)
    ):
        return list(value)
    raise ValueError(
        f"{key} must be auto (both flips when the data trains with flips) or a non-empty list of booleans, "
        f"[false] or [false, true], got {value!r}."
    )


def check_timesteps(
    key: str, timesteps: list[int] | None, num_timesteps: int, model: TextToImageModel
) -> list[int]:
    """The scoring timesteps for this model: the explicit list (each within the scheduler's range) or
    `num_timesteps` evenly spaced from 0 (at most the scheduler's count)."""
    num_t = int(model.scheduler.config.num_train_timesteps)
    if timesteps is not None:
        bad = [t for t in timesteps if not 0 <= t < num_t]
        if bad:
            raise ValueError(
                f"{key}: {bad} are outside [0, {num_t - 1}], the timesteps of this model's scheduler."
            )
        return list(timesteps)
    if num_timesteps > num_t:
        raise ValueError(
            f"method.num_timesteps={num_timesteps}: this model's scheduler has {num_t} timesteps, so "
            f"method.num_timesteps must be in [1, {num_t}]."
        )
    # evenly spaced from 0, as the paper ({0, 50, ..., 950} for 20 of 1000)
    return list(range(0, num_t, max(1, num_t // num_timesteps)))[:num_timesteps]


def most_captions(datamodule: Any) -> int:
    """The largest number of captions any example of the data has."""
    source = datamodule.source
    return max(len(source.captions(i)) for i in range(len(source)))


def check_caption_indices(key: str, captions: str | int | list[int], datamodule: Any) -> list[int]:
    """The caption indices `captions` stands for on this data; indices no example has are refused."""
    most = most_captions(datamodule)
    if captions == "all":
        return list(range(most))
    indices = list(range(captions)) if isinstance(captions, int) else list(captions)
    if max(indices) >= most:
        raise ValueError(
            f"{key}={captions}: no example of this data has more than {most} caption(s) (indices 0..{most - 1}). "
            f"Use {key}=all, a count in [1, {most}] or a list of indices in [0, {most - 1}]."
        )
    return indices


def check_vocabulary(
    model: TextToImageModel, captions: list[str], max_unknown_fraction: float = 0.05
) -> None:
    """A word-level tokenizer that does not know the data's words means the model was trained on
    other data: attribution would compare against captions the model never read."""
    if not is_word_level(model.tokenizer):
        return
    vocab = model.tokenizer.get_vocab()
    words = {w for c in captions for w in caption_words(c)}
    unknown = sorted(w for w in words if w not in vocab)
    if words and len(unknown) / len(words) > max_unknown_fraction:
        raise VocabularyMismatchError(
            f"The model's tokenizer does not know {len(unknown)} of the {len(words)} words in the data's captions "
            f"(e.g. {unknown[:8]}): this model was not trained on this data. Give the data= the model was "
            "trained on (its config is in <checkpoint>/training_config.yaml)."
        )


def with_constructor_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A data config with the keys it leaves out set to its datamodule's defaults: a checkpoint
    trained before a data setting existed recorded no value for it, and was trained with the default
    (e.g. data.concept_colours: white)."""
    try:
        target = hydra.utils.get_class(data["_target_"])
    except Exception:  # an unimportable target is reported where the data is built
        return dict(data)
    defaults = {
        name: param.default
        for name, param in inspect.signature(target.__init__).parameters.items()
        if param.default is not inspect.Parameter.empty and param.kind is param.POSITIONAL_OR_KEYWORD
    }
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, **data}


# Training data of these kinds is not what a checkpoint is attributed against: a customization
# (train.py experiment=customize, data=exemplars) is attributed against its pool plus its exemplars
# (data=abc, data=abc_embedded or data=folder), another kind by design.
CUSTOMIZATION_DATA_KINDS = frozenset({"CustomizationDataModule"})
# Data settings that name files or folders: the same place however it is spelled.
PATH_DATA_KEYS = frozenset({"root", "pool", "exemplars", "model_dir"})


def data_kind(data: Any) -> str:
    """The data group a `_target_` comes from (diffusion_attribution.data.shapes.ShapesDataModule ->
    shapes), as `data=` spells it."""
    target = str(data.get("_target_") or "")
    parts = target.split(".")
    return parts[-2] if len(parts) >= 2 else target


def _same_setting(key: str, mine: Any, theirs: Any) -> bool:
    if mine == theirs:
        return True
    if key in PATH_DATA_KEYS and isinstance(mine, str) and isinstance(theirs, str):
        return Path(mine).expanduser().resolve() == Path(theirs).expanduser().resolve()
    return False


def _override(key: str, value: Any) -> str:
    return f"data.{key}={json.dumps(value).replace(' ', '') if not isinstance(value, str) else json.dumps(value)}"


def check_training_data(model_path: str | Path | None, data_cfg: DictConfig) -> None:
    """Attribution ranks the model's own training set: a checkpoint written by train.py records the
    data it was trained on (training_config.yaml), and data= here must describe the same examples (same
    kind, same source settings, so the same ids) and the same exclusions (the training set the curvature
    or the kernel is built over)."""
    if not model_path:
        return
    config_file = Path(model_path) / CONFIG_FILE
    if not config_file.is_file():
        return  # a pipeline not trained here (e.g. Stable Diffusion): nothing to compare against
    trained = OmegaConf.load(config_file).get("data")
    if not trained or not trained.get("_target_"):
        return  # a checkpoint that records no training data (e.g. a customization built by a script)
    theirs = with_constructor_defaults(OmegaConf.to_container(trained, resolve=True))
    mine = with_constructor_defaults(OmegaConf.to_container(data_cfg, resolve=True))
    if str(theirs["_target_"]).rsplit(".", 1)[-1] in CUSTOMIZATION_DATA_KINDS:
        return
    if theirs.get("_target_") != mine.get("_target_"):
        settings = " ".join(
            _override(key, value)
            for key, value in sorted(theirs.items())
            if key not in LOADER_ONLY_DATA_KEYS | {"_target_", "resolution"} and value is not None
        )
        raise TrainingDataMismatchError(
            f"{model_path} was trained on data={data_kind(theirs)} ({theirs['_target_']}) but data= here is "
            f"data={data_kind(mine)} ({mine.get('_target_')}): training ids would name other images even where "
            f"the captions' words match. Attribute with the model's training data: data={data_kind(theirs)} "
            f"{settings} (its config is {config_file})."
        )
    differing = sorted(
        key
        for key in set(mine) | set(theirs)
        if key not in LOADER_ONLY_DATA_KEYS and not _same_setting(key, mine.get(key), theirs.get(key))
    )
    if differing:
        fix = " ".join(_override(key, theirs.get(key)) for key in differing)
        raise TrainingDataMismatchError(
            f"{model_path} was trained on different data: {', '.join(differing)} differ from data= here, so "
            f"training ids would not match. Attribute with the model's training data, e.g. add: {fix}"
        )
    check_exclusions(model_path, theirs.get("exclude"), mine.get("exclude"))


def _excluded(spec: Any) -> np.ndarray:
    # The data's size is not known here: any id >= 0 passes; the datamodule checks the range.
    return parse_id_list(spec, np.iinfo(np.int64).max)


def check_exclusions(model_path: str | Path, trained: Any, given: Any) -> None:
    """A checkpoint trained without some ids (a leave-K-out retrain) is attributed with the same
    data.exclude: the curvature (or the TRAK kernel) is built over the model's training ids, and the
    excluded ones are not among them."""
    if trained == given:
        return
    mine = _excluded(given)  # a bad spec of this run is reported as the datamodule reports it
    try:
        theirs = _excluded(trained)
    except DataError as error:  # e.g. the exclusion file the retrain read is gone
        raise TrainingDataMismatchError(
            f"{model_path} was trained with data.exclude={trained}, which cannot be read now ({error}); "
            f"data.exclude here is {given}. Attribute with the exclusion the model was trained with."
        ) from None
    if np.array_equal(mine, theirs):
        return
    if len(theirs) == 0:
        fix = "remove data.exclude (or set data.exclude=null)"
        what = "was trained on every example"
    else:
        spec = trained if isinstance(trained, str) else theirs.tolist()
        fix = f"add: {_override('exclude', spec)}"
        what = f"was trained without {len(theirs)} example(s) (ids {theirs[:10].tolist()}{' ...' if len(theirs) > 10 else ''})"
    raise TrainingDataMismatchError(
        f"{model_path} {what}, but data.exclude here is {given!r} ({len(mine)} excluded): the attribution would "
        f"be built over another training set than the model's. Attribute with the model's exclusions, {fix}"
    )


def claim_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """A run directory belongs to one configuration: rerunning the same config there resumes it,
    a different one is refused (outputs never overwrite an earlier run)."""
    stamp = run_dir / RUN_STAMP
    key = hash_json(OmegaConf.to_container(cfg, resolve=True))
    if stamp.is_file():
        existing = json.loads(stamp.read_text())
        if existing.get("config_hash") != key:
            raise FileExistsError(
                f"{run_dir} already holds a different attribution run (config hash {existing.get('config_hash')} "
                f"!= {key}). Leave hydra.run.dir at its default (a new directory per run) or pick an empty one."
            )
        log.info("Resuming the attribution run in %s", run_dir)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"config_hash": key}))
