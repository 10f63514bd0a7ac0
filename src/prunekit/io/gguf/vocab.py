"""The tokenizer of a GGUF file: carried over from a source GGUF exactly, or derived from a Hugging Face
byte-level BPE tokenizer (``tokenizer.json``) in llama.cpp's ``gpt2`` vocabulary format.

llama.cpp splits text before BPE with a pre-tokenizer it knows by name (``tokenizer.ggml.pre``); a wrong name
tokenizes differently without any error, so the name is recognised from the tokenizer's own pre-tokenizer (the
splitting expressions of llama.cpp's ``llama-vocab.cpp``), given by the caller, or the export is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.core.errors import ConfigError

#: GGUF's names of the special token ids (``tokenizer.ggml.<name>_token_id``)
_SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
#: llama.cpp token types (``llama_token_type``), as ``gguf.TokenType`` numbers them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5

#: transformers' ``Split`` expressions of the pre-tokenizers llama.cpp names (the originals in its table)
_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


@dataclass(frozen=True)
class GgufVocab:
    """The ``tokenizer.*`` fields of a GGUF file."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    source: str
    #: any other ``tokenizer.*`` field of a source GGUF, carried as it was: ``{key: (value, value types)}``
    extra: dict[str, tuple[Any, list[Any]]] = field(default_factory=dict)


def _steps(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return list(pre_tokenizer.get("pretokenizers", []))
    return [pre_tokenizer]


def recognised_pre(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for the pre-tokenizer of ``tokenizer.json``, or ``None`` when it is not one we know:
    GPT-2's expression alone (``gpt-2``), the same after splitting every digit (``smollm``), or Llama 3's or
    Qwen2's splitting expression before a byte-level step (``llama-bpe``, ``qwen2``)."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {})
        return _SPLIT_PATTERNS.get(pattern.get("Regex", ""))
    return None


def _merges(model: dict[str, Any]) -> list[str]:
    return [" ".join(merge) if isinstance(merge, list) else str(merge) for merge in model.get("merges", [])]


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS first and EOS last when it encodes text (what it does, not its flags)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (
        bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
        bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id and len(ids) > 1,
    )


def vocab_from_tokenizer(tokenizer: Any, vocab_size: int, pre: str | None = None) -> GgufVocab:
    """Derive the GGUF vocabulary of a transformers byte-level BPE tokenizer for a model with ``vocab_size``
    embedding rows: every token in id order (rows past the tokenizer's tokens are ``[PAD{i}]``, unused, as
    llama.cpp's converter writes them), its merges, special ids, chat template, and ``pre`` (recognised by
    :func:`recognised_pre` when not given)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: GGUF export needs tokenizer.json; "
            "or pass tokenizer_gguf= a GGUF file whose tokenizer to carry over"
        )
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder not in ("ByteLevel", None):
        raise ConfigError(
            f"only byte-level BPE tokenizers are exported to GGUF (this one is {model.get('type')!r} with a "
            f"{decoder!r} decoder): pass tokenizer_gguf= a GGUF file of the same model to carry its tokenizer over"
        )
    pre = pre or recognised_pre(data)
    if pre is None:
        raise ConfigError(
            "llama.cpp would not know this tokenizer's pre-tokenizer: pass its llama.cpp name (--tokenizer-pre, "
            "e.g. gpt-2, smollm, llama-bpe, qwen2), or --tokenizer-gguf a GGUF file of the same model"
        )
    by_id = {index: text for text, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embedding rows: "
            "they do not belong together"
        )
    added = {item["id"]: item for item in data.get("added_tokens", [])}
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[index])
            item = added.get(index)
            types.append(NORMAL if item is None else CONTROL if item.get("special") else USER_DEFINED)
    special_ids = {
        kind: int(value)
        for kind in ("bos", "eos", "unk", "pad")
        if (value := getattr(tokenizer, f"{kind}_token_id", None)) is not None
    }
    add_bos, add_eos = _adds(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    return GgufVocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        types=types,
        merges=_merges(model),
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template if isinstance(template, str) else None,
        source="tokenizer.json",
    )


#: the ``tokenizer.*`` fields :func:`write_vocab` writes from :class:`GgufVocab`'s own attributes
_WRITTEN = {
    f"tokenizer.{name}"
    for name in (
        "ggml.model",
        "ggml.pre",
        "ggml.tokens",
        "ggml.token_type",
        "ggml.merges",
        "ggml.bos_token_id",
        "ggml.eos_token_id",
        "ggml.unknown_token_id",
        "ggml.padding_token_id",
        "ggml.add_bos_token",
        "ggml.add_eos_token",
        "chat_template",
    )
}


def vocab_from_gguf(path: str | Path, vocab_size: int) -> GgufVocab:
    """Read the tokenizer of a GGUF file (the source of a model prunekit pruned) to carry it over exactly."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    found = {name: item for name, item in reader.fields.items() if name.startswith("tokenizer.")}
    fields = {name: item.contents() for name, item in found.items()}
    if "tokenizer.ggml.tokens" not in fields:
        raise ConfigError(f"{str(path)!r} holds no tokenizer (tokenizer.ggml.tokens): choose the model's own GGUF")
    tokens = list(fields["tokenizer.ggml.tokens"])
    if len(tokens) != vocab_size:
        raise ConfigError(
            f"{str(path)!r} has {len(tokens)} tokens but the model {vocab_size} embedding rows: it is not this "
            "model's tokenizer"
        )
    return GgufVocab(
        model=str(fields.get("tokenizer.ggml.model", "gpt2")),
        pre=str(fields.get("tokenizer.ggml.pre", "default")),
        tokens=tokens,
        types=[int(t) for t in fields.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))],
        merges=list(fields.get("tokenizer.ggml.merges", [])),
        special_ids={
            kind: int(fields[f"tokenizer.ggml.{key}_token_id"])
            for kind, key in _SPECIAL_KEYS.items()
            if f"tokenizer.ggml.{key}_token_id" in fields
        },
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
        source=str(path),
        extra={name: (fields[name], list(item.types)) for name, item in found.items() if name not in _WRITTEN},
    )


def write_vocab(writer: Any, vocab: GgufVocab) -> None:
    """Add ``vocab``'s fields to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    elif vocab.model == "gpt2":  # llama.cpp requires the key; the writer cannot infer an empty array's type
        from gguf import GGUFValueType, Keys

        writer.add_key_value(Keys.Tokenizer.MERGES, [], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
    for key, (value, types) in vocab.extra.items():
        writer.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)
