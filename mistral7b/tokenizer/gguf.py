"""The vocabulary embedded in a GGUF file, rebuilt as a `tokenizers.Tokenizer` that tokenizes as llama.cpp does.

Two kinds (`tokenizer.ggml.model`): "llama", a SentencePiece BPE vocabulary (Mistral 7B, Llama 2) with
pieces, scores and byte tokens; "gpt2", a byte-level BPE vocabulary with merges (SmolLM2, Mistral Nemo)
whose pre-tokenizer regexes depend on `tokenizer.ggml.pre`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from ..errors import CheckpointError
from ..gguf_file import open_gguf
from ..gguf_lib import Keys, TokenType
from .hf import HFTokenizer

K = Keys.Tokenizer
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (regexes applied one after the other, whether a word found whole in the vocabulary
# skips the merges, whether a sequence starts with BOS unless the file says otherwise): llama.cpp's table.
_PRE: dict[str, tuple[list[str], bool, bool]] = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], False, False),
    "gpt-2": ([_GPT2], False, False),
    "smollm": ([r"\p{N}", _GPT2], False, False),
    "llama-bpe": ([_LLAMA3], True, True),
    "qwen2": ([_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")], False, False),
    "tekken": ([r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"], True, True),
}
_PRE_ALIASES = {"starcoder": "smollm", "refact": "smollm", "codeshell": "smollm", "llama3": "llama-bpe",
                "llama-v3": "llama-bpe", "mpt": "gpt-2", "olmo": "gpt-2", "stablelm2": "qwen2"}


def load(path: Path) -> HFTokenizer:
    meta = open_gguf(path).metadata
    kind = meta.get(K.MODEL)
    if K.LIST not in meta or kind not in ("llama", "gpt2"):
        what = f"a '{kind}' vocabulary" if K.LIST in meta else "no vocabulary"
        raise CheckpointError(f"{path}: holds {what}; only 'llama' (SentencePiece) and 'gpt2' (BPE) GGUF "
                              "vocabularies are supported, pass the model's tokenizer file instead")
    tokens: list[str] = meta[K.LIST]
    types = meta.get(K.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)
    if kind == "llama":
        tokenizer = _sentencepiece(tokens, meta.get(K.SCORES) or [0.0] * len(tokens), types, meta)
        add_bos, bos_id, eos_id = True, 1, 2  # llama.cpp's defaults for this kind
    else:
        tokenizer, add_bos = _byte_level_bpe(tokens, meta, path)
        bos_id = eos_id = None
    # Control tokens are special (skipped when decoding, parsed only in chat templates); user-defined
    # ones are ordinary text that always tokenizes whole, as in llama.cpp.
    tokenizer.add_tokens([AddedToken(tokens[i], special=t == TokenType.CONTROL, normalized=False)
                          for i, t in enumerate(types) if t in (TokenType.CONTROL, TokenType.USER_DEFINED)])
    bos_id, eos_id = meta.get(K.BOS_ID, bos_id), meta.get(K.EOS_ID, eos_id)
    return HFTokenizer(tokenizer, bos=_text(tokens, bos_id), eos=_text(tokens, eos_id),
                       add_bos=meta.get(K.ADD_BOS, add_bos), chat_template=meta.get(K.CHAT_TEMPLATE), source=path,
                       stop_ids=[meta[k] for k in (K.EOT_ID, K.EOM_ID) if k in meta])


def _text(tokens: list[str], token_id: int | None) -> str | None:
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def _sentencepiece(tokens: list[str], scores: list[float], types: list[int], meta: dict) -> RustTokenizer:
    """SentencePiece BPE: repeatedly merge the adjacent pair whose union is the vocabulary piece of highest
    score. As `tokenizers` merges by rank, every split of every normal piece becomes a merge, ranked by
    the piece's score. SentencePiece breaks score ties by position (leftmost first); ranking the splits
    of one piece longest-left-part first reproduces that on runs of one character (spaces, '=', ...)."""
    vocab = {piece: i for i, piece in enumerate(tokens)}
    splits = [(-scores[i], -k, piece[:k], piece[k:]) for i, piece in enumerate(tokens) if types[i] == TokenType.NORMAL
              for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    unk = _text(tokens, meta.get(K.UNK_ID, 0))
    tokenizer = RustTokenizer(models.BPE(vocab, [(a, b) for *_, a, b in sorted(splits)], unk_token=unk,
                                         byte_fallback=True, fuse_unk=True))
    # SentencePiece's dummy prefix: "Hi" is encoded as " Hi", and decoding drops the first space.
    space_prefix = meta.get(K.ADD_PREFIX, True)
    to_pieces = [normalizers.Replace(" ", "▁")]
    from_pieces = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        to_pieces.insert(0, normalizers.Prepend("▁"))
        from_pieces.append(decoders.Strip(" ", 1, 0))
    tokenizer.normalizer = normalizers.Sequence(to_pieces)
    tokenizer.decoder = decoders.Sequence(from_pieces)
    return tokenizer


def _byte_level_bpe(tokens: list[str], meta: dict, path: Path) -> tuple[RustTokenizer, bool]:
    pre = meta.get(K.PRE, "default")
    if _PRE_ALIASES.get(pre, pre) not in _PRE:
        raise CheckpointError(f"{path}: pre-tokenizer '{pre}' is not supported (supported: "
                              f"{', '.join(sorted([*_PRE, *_PRE_ALIASES]))})")
    regexes, ignore_merges, add_bos = _PRE[_PRE_ALIASES.get(pre, pre)]
    merges = [_merge_pair(m) for m in meta.get(K.MERGES, [])]
    tokenizer = RustTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, add_bos


def _merge_pair(merge: str) -> tuple[str, str]:
    """"a b" -> ("a", "b"): split at the first space after the first character, as llama.cpp does."""
    i = merge.index(" ", 1)
    return merge[:i], merge[i + 1:]

