"""Custom Diffusion (Kumari et al., CVPR 2023), the customization behind the AbC benchmark: a new
token (`<new1>`, ...) is added to the tokenizer and the text encoder, and only the UNet's
cross-attention key/value projections (`attn2.to_k`, `attn2.to_v`) and the new token's embedding
row are trained on a handful of exemplar images whose captions use the token, optionally with
regularisation images (prior preservation) in every batch.

Every other weight stays bit-identical, the other rows of the embedding table included: their
gradient is masked to zero (so AdamW's moments for them stay zero), they get no weight decay, and
after every optimizer step they are copied back from the base model.

A customized model is saved two ways (`save_customized`):
- the usual diffusers-style checkpoint folder (models/pipeline.py `save_pretrained`), which every job
  loads with `model.path=<folder>`;
- `customization.safetensors` beside it: only what changed (the trained UNet weights and the new
  token rows), loadable on top of the base model with `load_customization` / `model=custom_diffusion`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file
from torch import nn

from diffusion_attribution.models.pipeline import TextToImageModel
from diffusion_attribution.models.weight_subsets import select_parameters
from diffusion_attribution.utils.atomic import is_safetensors_file
from diffusion_attribution.utils.fingerprint import model_fingerprint

log = logging.getLogger(__name__)


DELTA_FILE = "customization.safetensors"


DELTA_METADATA_KEY = "diffusion_attribution.customization"


UNET_PREFIX = "unet."


TOKEN_PREFIX = "token_embedding."


class CustomizationError(ValueError):
    """A customization that cannot be applied as given; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------ tokens
def token_embedding_table(model: TextToImageModel) -> nn.Embedding:
    table = model.text_encoder.get_input_embeddings()
    if not isinstance(table, nn.Embedding):
        raise CustomizationError(
            f"The text encoder's input embeddings are a {type(table).__name__}, not an nn.Embedding: "
            "new tokens cannot be added to it."
        )
    return table


def single_token_id(model: TextToImageModel, word: str) -> list[int]:
    """The token ids `word` encodes to (without BOS/EOS)."""
    return list(model.tokenizer(word, add_special_tokens=False).input_ids)


def add_concept_tokens(
    model: TextToImageModel,
    tokens: Sequence[str],
    initializer_words: Sequence[str | None] | None = None,
) -> list[int]:
    """Add `tokens` to the tokenizer and grow the text encoder's embedding table; return their ids.

    A new row starts as the mean embedding of its initializer word's tokens, or (no initializer) as
    the mean of the whole existing table. Tokens the tokenizer already has keep their rows (loading a
    customization onto a model that already holds the token). Existing rows are copied exactly.
    """
    tokens = [str(t) for t in tokens]
    if not tokens:
        raise CustomizationError("Give at least one token to add, e.g. tokens=['<new1>'].")
    initializer_words = list(initializer_words or [None] * len(tokens))
    if len(initializer_words) != len(tokens):
        raise CustomizationError(
            f"{len(tokens)} tokens but {len(initializer_words)} initializer words: give one per token "
            "(null for the mean embedding)."
        )
    vocab = model.tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    table = token_embedding_table(model)
    old_rows = table.weight.shape[0]
    if new:
        model.tokenizer.add_tokens(new)
        # mean_resizing=False: the new rows are set just below, no need for transformers' sampling.
        model.text_encoder.resize_token_embeddings(len(model.tokenizer), mean_resizing=False)
        table = token_embedding_table(model)
    ids = [int(model.tokenizer.convert_tokens_to_ids(t)) for t in tokens]
    with torch.no_grad():
        weight = table.weight
        base_mean = weight[:old_rows].mean(dim=0)
        for token, token_id, word in zip(tokens, ids, initializer_words, strict=True):
            if token not in new:
                continue
            if word is None:
                weight[token_id] = base_mean
                continue
            word_ids = single_token_id(model, word)
            unknown = model.tokenizer.unk_token_id
            if not word_ids or any(i >= old_rows or (unknown is not None and i == unknown) for i in word_ids):
                raise CustomizationError(
                    f"Initializer word {word!r} for {token} encodes to {word_ids}: give a word the model "
                    "already knows (or null for the mean embedding)."
                )
            weight[token_id] = weight[word_ids].mean(dim=0)
    # The tokenizer must encode each token as exactly one id, or the prompt would not reach its row.
    for token, token_id in zip(tokens, ids, strict=True):
        encoded = single_token_id(model, token)
        if encoded != [token_id]:
            raise CustomizationError(
                f"The tokenizer encodes {token} as {encoded}, not as its own id {token_id}."
            )
    return ids


# ------------------------------------------------------------------------------------------ weights
def load_unet_subset(
    unet: nn.Module, state: Mapping[str, torch.Tensor], source: str, subset: str = "kv"
) -> list[str]:
    """Copy `state` into the UNet's `subset` weights, strictly: every weight of the subset must be in
    `state` (missing keys are an error), every key must be one of them (unexpected keys are an error)
    and shapes must match. Errors name the keys and `source`. Returns the names loaded."""
    expected = select_parameters(unet, subset)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} key(s) the UNet's {subset} weights need: {_listed(missing)}"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s) that are not {subset} weights: {_listed(unexpected)}"
            )
        raise CustomizationError(
            f"{source}: {'; '.join(parts)}. The file must hold exactly the cross-attention key/value "
            "weights of this UNet (attn2.to_k / attn2.to_v): check that it was made for this base model."
        )
    wrong = [
        f"{name} {tuple(state[name].shape)} (UNet: {tuple(param.shape)})"
        for name, param in expected.items()
        if tuple(state[name].shape) != tuple(param.shape)
    ]
    if wrong:
        raise CustomizationError(f"{source}: shapes differ from the UNet's: {_listed(wrong)}.")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(state[name].to(param.dtype))
    return list(expected)


def _listed(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def customization_tensors(
    model: TextToImageModel, tokens: Sequence[str], subset: str = "kv"
) -> dict[str, torch.Tensor]:
    """What a customization changed: the UNet subset and the tokens' embedding rows."""
    tensors = {
        f"{UNET_PREFIX}{name}": p.detach().cpu().clone()
        for name, p in select_parameters(model.unet, subset).items()
    }
    weight = token_embedding_table(model).weight
    for token in tokens:
        token_id = int(model.tokenizer.convert_tokens_to_ids(token))
        tensors[f"{TOKEN_PREFIX}{token}"] = weight[token_id].detach().cpu().clone()
    return tensors


def save_customization_delta(
    model: TextToImageModel,
    path: str | Path,
    tokens: Sequence[str],
    subset: str = "kv",
    base_fingerprint: str | None = None,
) -> Path:
    path = Path(path)
    metadata = {"tokens": list(tokens), "subset": subset, "base_model": base_fingerprint}
    save_file(
        {k: v.contiguous() for k, v in customization_tensors(model, tokens, subset).items()},
        str(path),
        metadata={DELTA_METADATA_KEY: json.dumps(metadata)},
    )
    return path


def load_customization(model: TextToImageModel, path: str | Path) -> TextToImageModel:
    """Apply a `customization.safetensors` (or a folder holding one) to a base model, in place:
    add its tokens with their trained rows and load its UNet weights strictly."""
    path = Path(path)
    if path.is_dir():
        path = path / DELTA_FILE
    if not path.is_file():
        raise CustomizationError(
            f"{path} does not exist: give a {DELTA_FILE} written by the customization (train.py "
            "experiment=customize writes it beside the checkpoint folder's weights)."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(DELTA_METADATA_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
    except Exception as error:  # truncated or not safetensors
        raise CustomizationError(
            f"Cannot read {path} ({str(error).splitlines()[0] if str(error) else type(error).__name__}): it "
            "is truncated or not a safetensors file. Copy it again, or rerun train.py experiment=customize."
        ) from error
    if raw is None:
        raise CustomizationError(
            f"{path} has no customization metadata: it was not written by save_customized."
        )
    metadata = json.loads(raw)
    base = metadata.get("base_model")
    if base and base != model_fingerprint(model):
        log.warning(
            "%s was trained on a base model with fingerprint %s; this model's is %s (loading anyway).",
            path,
            base,
            model_fingerprint(model),
        )
    tokens = list(metadata["tokens"])
    missing_rows = [t for t in tokens if f"{TOKEN_PREFIX}{t}" not in tensors]
    if missing_rows:
        raise CustomizationError(f"{path}: no embedding row for token(s) {missing_rows}.")
    width = token_embedding_table(model).weight.shape[1]
    for token in tokens:  # checked before the model is changed
        row = tensors[f"{TOKEN_PREFIX}{token}"]
        if tuple(row.shape) != (width,):
            raise CustomizationError(
                f"{path}: the row of {token} has shape {tuple(row.shape)}, the text encoder's width is {width}: "
                "the customization was made for another base model."
            )
    ids = add_concept_tokens(model, tokens)
    weight = token_embedding_table(model).weight
    with torch.no_grad():
        for token, token_id in zip(tokens, ids, strict=True):
            weight[token_id] = tensors[f"{TOKEN_PREFIX}{token}"].to(weight.dtype)
    unet_state = {k[len(UNET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    others = sorted(k for k in tensors if not k.startswith((UNET_PREFIX, TOKEN_PREFIX)))
    if others:
        raise CustomizationError(f"{path}: unexpected entries {_listed(others)}.")
    load_unet_subset(model.unet, unet_state, str(path), metadata.get("subset", "kv"))
    return model


def load_customized_model(
    captions: Sequence[str] | None = None,
    base_path: str | Path | None = None,
    customization: str | Path | None = None,
    resolution: int | None = None,
) -> TextToImageModel:
    """`model=custom_diffusion`: a base model folder plus a customization on top of it: our
    `customization.safetensors` (or a folder holding it), or a released AbC model folder."""
    if not base_path or not customization:
        raise CustomizationError(
            "model=custom_diffusion needs model.base_path=<base model folder> and "
            "model.customization=<customization.safetensors, or an AbC model folder>."
        )
    model = TextToImageModel.from_pretrained(base_path)
    if resolution and model.image_resolution != int(resolution):
        raise CustomizationError(
            f"The base model at {base_path} makes {model.image_resolution}px images but model.resolution is "
            f"{resolution}: set model.resolution={model.image_resolution}."
        )
    target = Path(customization)
    if target.is_dir() and not (target / DELTA_FILE).is_file():
        return apply_abc_customization(model, target)
    return load_customization(model, target)


TOKEN_FILE = "<new1>.bin"


WEIGHTS_FILE = "pytorch_custom_diffusion_weights.pt"


# What diffusers' own `save_attn_procs` names the K/V weights (pickled tensors / safetensors).
WEIGHTS_FILE_ALTERNATIVES = (
    WEIGHTS_FILE,
    "pytorch_custom_diffusion_weights.bin",
    "pytorch_custom_diffusion_weights.safetensors",
)


def _load_torch_file(path: Path, what: str) -> Any:
    """A tensor file in either format, told apart by content (not by name): safetensors, read with
    safetensors; otherwise a torch.save file of tensors, read with torch.load(weights_only=True), which
    never runs code from the file."""
    if not path.is_file():
        raise CustomizationError(f"{path} does not exist: the customized model folder must hold {what}.")
    if is_safetensors_file(path):
        try:
            return load_safetensors_file(str(path), device="cpu")
        except Exception as error:
            raise CustomizationError(
                f"{path} looks like a safetensors file but cannot be read ({error}): it is truncated or "
                f"damaged. Copy or download {what} again."
            ) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as error:  # pickled code is refused; a truncated or foreign file fails here too
        # torch's own message advises loading without weights_only, which would run code from the file:
        # say what the file is instead.
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "weights_only" in str(error) or "Weights only" in str(error):
            detail = "it holds pickled objects other than tensors, dicts and lists"
        raise CustomizationError(
            f"Cannot read {path} ({what}): it is neither a safetensors file nor a PyTorch file of plain "
            f"tensors ({detail}). Give the file as diffusers writes it (save_attn_procs / "
            "save_textual_inversion, safetensors or torch.save of a dict of tensors); if it is truncated, "
            "copy or download it again."
        ) from error


def read_token_embedding(path: str | Path) -> dict[str, torch.Tensor]:
    """`<new1>.bin`: {token: embedding vector} (diffusers' textual-inversion format)."""
    path = Path(path)
    state = _load_torch_file(path, f"the token embedding ({TOKEN_FILE})")
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CustomizationError(
            f"{path} must hold a {{token: embedding tensor}} dict, got {type(state).__name__}."
        )
    return {k: v.reshape(-1) if v.dim() == 2 and v.shape[0] == 1 else v for k, v in state.items()}


def read_kv_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """`pytorch_custom_diffusion_weights.pt`: UNet parameter names -> tensors. Names in diffusers'
    attention-processor form (`...attn2.processor.to_k_custom_diffusion.weight`) are mapped to the
    UNet's own (`...attn2.to_k.weight`)."""
    path = Path(path)
    state = _load_torch_file(path, f"the cross-attention K/V weights ({WEIGHTS_FILE})")
    if isinstance(state, dict):
        # diffusers' save_attn_procs writes an empty {} for every processor without weights (the
        # self-attention `attn1` ones of Custom Diffusion): nothing to load there.
        state = {k: v for k, v in state.items() if not (isinstance(v, Mapping) and not v)}
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        bad = (
            [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
            if isinstance(state, dict)
            else []
        )
        raise CustomizationError(
            f"{path} must hold a flat {{parameter name: tensor}} dict"
            + (f"; entries that are not tensors: {_listed([str(k) for k in bad])}" if bad else "")
            + (f", got {type(state).__name__}" if not isinstance(state, dict) else "")
            + ("; it is empty" if isinstance(state, dict) and not state else "")
            + "."
        )
    renamed = {}
    for key, value in state.items():
        name = key.replace(".processor.to_k_custom_diffusion.", ".to_k.").replace(
            ".processor.to_v_custom_diffusion.", ".to_v."
        )
        renamed[name] = value
    return renamed


def apply_abc_customization(model: TextToImageModel, model_dir: str | Path) -> TextToImageModel:
    """Stable Diffusion (or any base) + an AbC customized model folder, in place: the token with its
    embedding row, then the K/V weights, checked strictly against the UNet."""

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CustomizationError(f"Customized model folder {model_dir} does not exist.")
    embeddings = read_token_embedding(model_dir / TOKEN_FILE)
    weights_file = next(
        (model_dir / name for name in WEIGHTS_FILE_ALTERNATIVES if (model_dir / name).is_file()),
        model_dir / WEIGHTS_FILE,
    )
    weights = read_kv_weights(weights_file)  # read both before changing the model
    width = token_embedding_table(model).weight.shape[1]
    for token, row in embeddings.items():
        if tuple(row.shape) != (width,):
            raise CustomizationError(
                f"{model_dir / TOKEN_FILE}: the embedding of {token} has shape {tuple(row.shape)}, the text "
                f"encoder's width is {width}."
            )
    tokens = list(embeddings)
    ids = add_concept_tokens(model, tokens)
    table = token_embedding_table(model).weight
    with torch.no_grad():
        for token, token_id in zip(tokens, ids, strict=True):
            table[token_id] = embeddings[token].to(table.dtype)
    load_unet_subset(model.unet, weights, str(weights_file), "kv")
    return model
