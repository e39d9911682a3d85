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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..methods.weight_subsets import select_parameters
from ..models.pipeline import TextToImageModel
from ..utils.fingerprint import model_fingerprint
from .training import min_snr_weights, warmup_cosine

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
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(DELTA_METADATA_KEY)
        if raw is None:
            raise CustomizationError(
                f"{path} has no customization metadata: it was not written by save_customized."
            )
        metadata = json.loads(raw)
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
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
        from ..data.abc import apply_abc_customization  # the released AbC format

        return apply_abc_customization(model, target)
    return load_customization(model, target)


# ------------------------------------------------------------------------------------------ training
def noise_prediction_loss(
    model: TextToImageModel, pixels: torch.Tensor, captions: list[str], min_snr_gamma: float | None = None
) -> torch.Tensor:
    """Per-example training loss [B] at random timesteps and noise (the training recipe's loss)."""
    latents = model.encode_images(pixels)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, model.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    )
    prediction = model.predict(
        model.add_noise(latents, noise, timesteps), timesteps, model.encode_text(captions)
    )
    target = model.target(latents, noise, timesteps)
    per_example = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma is None:
        return per_example
    return min_snr_weights(model, timesteps, min_snr_gamma) * per_example


class CustomDiffusionModule(pl.LightningModule):
    """Fine-tune a base model toward a concept: the new tokens' embedding rows and the UNet's
    `params` subset (cross-attention K/V by default) train; everything else is frozen bit-exactly.

    Batches are `{"exemplars": batch, "regularization": batch}` (the second optional): the loss is the
    exemplars' mean loss plus `prior_loss_weight` times the regularisation images' mean loss.
    """

    def __init__(
        self,
        model: TextToImageModel,
        max_steps: int,
        tokens: Sequence[str] = ("<new1>",),
        initializer_words: Sequence[str | None] | None = None,
        params: str = "kv",
        lr: float = 1e-3,
        embedding_lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        prior_loss_weight: float = 1.0,
        caption_dropout: float = 0.0,
        min_snr_gamma: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.max_steps = max_steps
        self.params = params
        self.lr = lr
        self.embedding_lr = lr if embedding_lr is None else embedding_lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.prior_loss_weight = prior_loss_weight
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma
        self.base_fingerprint = model_fingerprint(model)
        self.tokens = [str(t) for t in tokens]
        self.token_ids = add_concept_tokens(model, self.tokens, initializer_words)
        # Loaded models come in eval mode and Lightning keeps a module's mode at the start of fit (it
        # warns "Found N module(s) in eval mode"); train as Custom Diffusion does, in train mode.
        model.train()
        model.unet.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        if model.vae is not None:
            model.vae.requires_grad_(False).eval()  # frozen encoder: as at inference
        self.trained_unet = select_parameters(model.unet, params)
        for param in self.trained_unet.values():
            param.requires_grad_(True)
        embedding = token_embedding_table(model).weight
        embedding.requires_grad_(True)
        rows = torch.zeros(embedding.shape[0], dtype=torch.bool)
        rows[self.token_ids] = True
        self.register_buffer("token_rows", rows, persistent=False)
        # The other rows as they were: restored after every step so they stay bit-identical.
        self.register_buffer("frozen_rows", embedding.detach().clone(), persistent=False)
        embedding.register_hook(self._mask_embedding_gradient)

    def _mask_embedding_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.token_rows.to(grad.device, grad.dtype)[:, None]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.trained_unet.values()
        yield token_embedding_table(self.model).weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        exemplars = batch["exemplars"] if "exemplars" in batch else batch
        captions = [
            "" if self.caption_dropout and torch.rand(()).item() < self.caption_dropout else c
            for c in exemplars["caption"]
        ]
        loss = noise_prediction_loss(
            self.model, exemplars["pixel_values"], captions, self.min_snr_gamma
        ).mean()
        self.log("train/exemplar_loss", loss, batch_size=len(captions))
        regularization = batch.get("regularization") if isinstance(batch, dict) else None
        if regularization is not None and self.prior_loss_weight > 0:
            prior = noise_prediction_loss(
                self.model,
                regularization["pixel_values"],
                list(regularization["caption"]),
                self.min_snr_gamma,
            ).mean()
            self.log("train/prior_loss", prior, batch_size=len(regularization["caption"]))
            loss = loss + self.prior_loss_weight * prior
        self.log("train/loss", loss, prog_bar=True, batch_size=len(captions))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.restore_frozen_rows()

    def restore_frozen_rows(self) -> None:
        weight = token_embedding_table(self.model).weight
        with torch.no_grad():
            keep = ~self.token_rows.to(weight.device)
            weight[keep] = self.frozen_rows.to(weight.device)[keep]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [
            {"params": list(self.trained_unet.values()), "lr": self.lr, "weight_decay": self.weight_decay},
            # No weight decay on the table: AdamW's decay would shrink every row, not only the new one.
            {
                "params": [token_embedding_table(self.model).weight],
                "lr": self.embedding_lr,
                "weight_decay": 0.0,
            },
        ]
        optimizer = torch.optim.AdamW(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @contextmanager
    def ema_weights(self) -> Iterator[TextToImageModel]:
        """The model as trained (Custom Diffusion keeps no EMA); lets the training callbacks sample."""
        yield self.model

    def save_customized(self, path: str | Path, config: Any = None) -> Path:
        """The full checkpoint folder plus `customization.safetensors` (the delta over the base)."""
        path = Path(path)
        self.model.save_pretrained(path, config=config)
        save_customization_delta(
            self.model, path / DELTA_FILE, self.tokens, self.params, self.base_fingerprint
        )
        (path / "customization.json").write_text(
            json.dumps(
                {
                    "tokens": self.tokens,
                    "token_ids": self.token_ids,
                    "params": self.params,
                    "base_model": self.base_fingerprint,
                },
                indent=2,
            )
        )
        return path
