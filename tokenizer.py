"""Tokenizers of Hugging Face checkpoints without transformers: `tokenizer.json` through the `tokenizers`
library, else `tokenizer.model` through `sentencepiece`.

BOS/EOS follow the checkpoint's own files, because log-likelihood scoring and generation (the paper,
appendix A.3) must see exactly the tokens the model was trained with: Llama prepends BOS
(`add_bos_token: true` in tokenizer_config.json, or a BOS template in tokenizer.json's post-processor
for Llama 3); Phi's GPT-2 style tokenizer adds nothing.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

import files

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class _Backend(Protocol):
    vocab_size: int
    path: Path  # the file it was read from

    def encode(self, text: str) -> list[int]: ...
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...
    def surfaces(self) -> list[bytes | None]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_id(self, token: str) -> int | None: ...
    def prepends(self, token_id: int) -> bool: ...
    def builtin_ids(self) -> tuple[int | None, int | None]: ...
    def pieces(self) -> list[str | None]: ...


class _HFTokenizers:
    """tokenizer.json via the `tokenizers` library. Special tokens are added by Tokenizer, not here."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = path
        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for an unreadable file
            raise ValueError(_unreadable(path, "the tokenizers library", e)) from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text` (the library tracks them
        through its normaliser; the bytes of one character split over tokens share its span)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def surfaces(self) -> list[bytes | None]:
        """The bytes each id writes into the text (None: an added/special token).

        Byte-level BPE (GPT-2, Llama 3) spells bytes as printable characters ("Ġ" = space);
        Llama 2's converted tokenizer.json writes spaces as "▁" and falls back to "<0xNN>"
        pieces; word-level and WordPiece tokenizers whose pre-tokenizer drops whitespace hold
        words, read as starting after a space, and continuations after their prefix ("##")."""
        spec = json.loads(self.tok.to_str())
        kinds = _component_types(spec.get("pre_tokenizer")) | _component_types(spec.get("decoder"))
        model = spec.get("model") or {}
        prefix = model.get("continuing_subword_prefix") or None
        drops_spaces = bool(kinds & {"Whitespace", "WhitespaceSplit", "BertPreTokenizer"})
        byte_fallback = bool(model.get("byte_fallback"))
        added = {t["id"] for t in spec.get("added_tokens", [])}
        decode_byte_level = {c: b for b, c in _bytes_to_unicode().items()}
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            token = self.tok.id_to_token(i)
            if token is None or i in added:
                out.append(None)
            elif "ByteLevel" in kinds:
                out.append(bytes(decode_byte_level[c] for c in token))
            elif byte_fallback and _BYTE_PIECE.fullmatch(token):
                out.append(bytes([int(token[3:5], 16)]))
            elif drops_spaces:
                word = token[len(prefix):] if prefix and token.startswith(prefix) else " " + token
                out.append(word.encode())
            else:
                out.append(token.replace("\u2581", " ").encode())
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def prepends(self, token_id: int) -> bool:
        """Whether the file's post-processor puts `token_id` first (Llama 3 declares BOS only there)."""
        return self.tok.encode("a", add_special_tokens=True).ids[:1] == [token_id]

    def builtin_ids(self) -> tuple[int | None, int | None]:
        return None, None  # tokenizer.json does not say which added token is BOS/EOS

    def pieces(self) -> list[str | None]:
        return [self.tok.id_to_token(i) for i in range(self.vocab_size)]


class _SentencePiece:
    """tokenizer.model via `sentencepiece` (Llama 1/2 and Vicuna ship one)."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(_unreadable(path, "sentencepiece", e)) from e
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans; sentencepiece reports UTF-8 byte offsets, converted here. A
        character split into byte pieces gives its leading pieces an empty span at its start."""
        proto = self.sp.encode(text, return_type="proto")
        char_at = _char_index_of_bytes(text)
        return ([p.id for p in proto.pieces],
                [(char_at[p.begin], char_at[p.end]) for p in proto.pieces])

    def surfaces(self) -> list[bytes | None]:
        """The bytes each id writes into the text ("▁" is a space, "<0xNN>" one byte); None for
        control and unknown pieces."""
        sp, out = self.sp, []
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i):
                out.append(None)
            elif sp.is_byte(i):
                out.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                out.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
        return out

    def decode(self, ids: list[int]) -> str:
        special = {self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()}
        return self.sp.decode([i for i in ids if i not in special])

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def prepends(self, token_id: int) -> bool:
        return True  # LlamaTokenizer's default add_bos_token=True, used when tokenizer_config is silent

    def builtin_ids(self) -> tuple[int | None, int | None]:
        """BOS/EOS as trained into the model file (-1 = none)."""
        return tuple(i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id()))

    def pieces(self) -> list[str | None]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]


class Tokenizer:
    """encode/decode with the checkpoint's BOS convention: `encode` adds BOS when the checkpoint
    does (`add_bos` overrides it per call), never EOS; `pad_id` is the pad token, else EOS, else 0.

    `decode` skips special tokens (BOS/EOS/pad), which is what generated text needs.
    """

    def __init__(self, backend: _Backend, bos_id: int | None, eos_id: int | None, pad_id: int, add_bos: bool):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
        self.vocab_size = backend.vocab_size

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; add_bos None follows the checkpoint (Llama: BOS first, Phi: none)."""
        bos = self.add_bos if add_bos is None else add_bos
        prefix = [self.bos_id] if bos and self.bos_id is not None else []
        return prefix + self.backend.encode(text)

    def encode_with_offsets(self, text: str, add_bos: bool | None = None
                            ) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode` with each token's (start, end) character span in `text`; BOS spans (0, 0)."""
        ids, spans = self.backend.encode_with_offsets(text)
        bos = self.add_bos if add_bos is None else add_bos
        if bos and self.bos_id is not None:
            return [self.bos_id] + ids, [(0, 0)] + spans
        return ids, spans

    def surfaces(self) -> list[bytes | None]:
        """Per id, the bytes the token writes into the text; None for special tokens."""
        return self.backend.surfaces()

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))

    def vocabulary(self) -> list[str | None]:
        """Every id's piece, the token's own string ("▁the", "<0x0A>", "<s>"; added and special
        tokens included; None for an id the file leaves unused). Unlike decoding one id at a
        time, this is the same for a sentencepiece tokenizer.model and the tokenizer.json
        converted from it: decoding turns "<unk>" into " ⁇ " in one and "" in the other, and a
        byte piece into a partial UTF-8 character."""
        return self.backend.pieces()


def load_tokenizer_dir(ckpt_dir: Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json preferred, else tokenizer.model)."""
    if (ckpt_dir / "tokenizer.json").is_file():
        backend: _Backend = _HFTokenizers(ckpt_dir / "tokenizer.json")
    elif (ckpt_dir / "tokenizer.model").is_file():
        backend = _SentencePiece(ckpt_dir / "tokenizer.model")
    else:
        raise FileNotFoundError(
            f"{ckpt_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer files of "
            "the original repo into it"
        )
    settings = _special_token_settings(ckpt_dir)
    bos_id, eos_id, pad_id = (_token_id(backend, settings.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    builtin_bos, builtin_eos = backend.builtin_ids()
    bos_id = builtin_bos if bos_id is None else bos_id
    eos_id = builtin_eos if eos_id is None else eos_id
    add_bos = settings.get("add_bos_token")
    if add_bos is None:
        add_bos = bos_id is not None and backend.prepends(bos_id)
    return Tokenizer(backend, bos_id, eos_id, _first_int(pad_id, eos_id, 0), bool(add_bos) and bos_id is not None)


def _unreadable(path: Path, reader: str, error: Exception) -> str:
    return (f"cannot read {path} with {reader} ({error}); the file is truncated or not a "
            f"tokenizer: copy it again from the checkpoint's original repo")


def _special_token_settings(ckpt_dir: Path) -> dict[str, Any]:
    """tokenizer_config.json over special_tokens_map.json (transformers reads both)."""
    settings: dict[str, Any] = {}
    for name in reversed(CONFIG_FILES):
        path = ckpt_dir / name
        if path.is_file():
            found = files.read_json(path, fix="copy the file of the original checkpoint again")
            settings.update({k: v for k, v in found.items() if v is not None})
    return settings


def _token_id(backend: _Backend, token: str | dict | None) -> int | None:
    """Id of a special token given as a string or an AddedToken dict ({"content": ...})."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_id(token) if token else None


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _component_types(component: dict | None) -> set[str]:
    """The "type" names of a tokenizer.json component, looking inside Sequence components."""
    if not component:
        return set()
    parts = component.get("pretokenizers") or component.get("decoders") or []
    return {component.get("type", "")}.union(*(_component_types(p) for p in parts))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _char_index_of_bytes(text: str) -> list[int]:
    """For every UTF-8 byte offset 0..len(bytes) of `text`, the index of the character holding it."""
    index = []
    for i, ch in enumerate(text):
        index += [i] * len(ch.encode())
    return index + [len(text)]


def _first_int(*values: int | None) -> int:
    return next(v for v in values if v is not None)
