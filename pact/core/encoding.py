"""The ONE encoding shared by precompute, training and evaluation.

tokenizer + example + options -> input_ids, labels (-100 on the prompt), the
response span and hashes of the token ids. The position convention: step t
(0-based) is the distribution that predicts response token t, i.e. the logits
at input position `response_start - 1 + t`.

The response ends at the template's end-of-turn token: the labels (and PACT's
steps) run from the first assistant token through the special token the template
writes right after the assistant message (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`, `<|end|>`, eos). What the template writes after it (the newline of
Qwen, Gemma and Phi-3; Phi-3's eos) is never generated, so it is no label and no
step, and it is left out of input_ids altogether: nothing after the last label
changes a loss or a target. `EncodingOptions.label_after_end_of_turn` keeps those
tokens as labels, the way the paper's code trains them.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pact.core.errors import PactError

if TYPE_CHECKING:  # the type only: encoding (and so the trainer) does not load data ingestion
    from pact.core.data import Example

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("response_tail",)
HEADER_FALLBACK = "Assistant:"
DUMMY_TURN = [{"role": "user", "content": "hello"}]
TURN_PROBE = "pact-turn-probe"

# Used for tokenizers that ship no chat template; recorded in the template fingerprint.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + (eos_token or '') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class EncodingOptions:
    """max_length: tokens of prompt + response; truncation: what gives way when too long."""

    max_length: int = 1024
    truncation: str = "response_tail"
    # True: label what the template writes after the end-of-turn token too (the paper's code)
    label_after_end_of_turn: bool = False

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise PactError(f"max_length must be at least 2, got {self.max_length}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise PactError(f"unknown truncation policy {self.truncation!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> EncodingOptions:
        """The options a store or run recorded. A record without `label_after_end_of_turn`
        comes from a pact that labelled past the end-of-turn token: True. TypeError on
        unknown keys."""
        return cls(**{"label_after_end_of_turn": True, **recorded})


@dataclass(frozen=True)
class Encoded:
    """One encoded example. L = len(input_ids); the response is input_ids[start:start+length]."""

    example_id: str
    input_ids: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L], IGNORE_INDEX outside the response
    response_start: int
    response_length: int
    token_hash: str
    response_hash: str
    truncated: bool

    @property
    def response_ids(self) -> np.ndarray:
        return self.input_ids[self.response_start : self.response_start + self.response_length]


def hash_ids(ids: Any) -> str:
    """sha256 (first 16 hex) of the ids as little-endian int32."""
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()[:16]


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template, or pact's fallback when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    return template or FALLBACK_CHAT_TEMPLATE


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template applied to `messages`, as text."""
    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            chat_template=chat_template(tokenizer),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # jinja errors carry no common base class
        raise PactError(f"the chat template failed to render: {str(exc).splitlines()[0]}") from None
    if not isinstance(text, str):
        raise PactError("the chat template did not render to text")
    return text


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without added special tokens (templates carry their own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# Bounded tokenisation of long texts (`leading_token_ids`): the first prefix tried holds
# this many characters per wanted token, and the tokens kept must lie this many tokens
# before the cut in two prefixes (one twice the other) that agree on them.
PREFIX_CHARS_PER_TOKEN = 8
PREFIX_MARGIN_TOKENS = 32


def leading_token_ids(tokenizer: Any, text: str, count: int) -> tuple[list[int], bool]:
    """The token ids of `text` as `tokenize` gives them, without tokenising all of a text
    far longer than `count` tokens: (ids, True) with every id when the text is short or
    holds at most about `count` tokens; else (the first `count` ids, False).

    A long text is tokenised by prefixes of growing length (doubling from
    (count + margin) x 8 characters) until two prefixes, one twice as long as the other,
    both hold `count` + margin tokens and agree on the first `count`: a token's choice
    depends only on the text near it, so those are the first `count` tokens of the whole
    text. The work is bounded by the length of the prefixes, not of the text (a 50 MB
    response costs a few prefixes of kilobytes)."""
    wanted = count + PREFIX_MARGIN_TOKENS
    chars = wanted * PREFIX_CHARS_PER_TOKEN
    previous: list[int] | None = None
    while chars < len(text):
        ids = tokenize(tokenizer, text[:chars])
        if len(ids) < wanted:
            previous = None
        elif previous is not None and ids[:count] == previous[:count]:
            return ids[:count], False
        else:
            previous = ids
        chars *= 2
    return tokenize(tokenizer, text), True


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special tokens, text -> id: its named ones (bos, eos, pad, ...,
    additional) and every added token marked special (Phi-3's `<|end|>` is only that)."""
    specials = {
        str(t): int(i)
        for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=False)
        if i is not None
    }
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            specials[str(token)] = int(token_id)
    return {text: i for text, i in specials.items() if text}


def template_turn_end(tokenizer: Any) -> tuple[int, list[int]] | None:
    """(end-of-turn id, the ids the template writes after it) for an assistant message,
    from the template rendered on a probe turn; None when the template writes no
    special token right after the message (then nothing marks the end of a turn).
    Remembered per tokenizer, template, eos and vocabulary size (encoding calls it per example)."""
    key = (chat_template(tokenizer), getattr(tokenizer, "eos_token", None), len(tokenizer))
    try:
        cached = _TURN_ENDS.get(tokenizer)
    except TypeError:  # a tokenizer that cannot be weakly referenced: no memo
        return _template_turn_end(tokenizer)
    if cached is None or cached[0] != key:
        cached = (key, _template_turn_end(tokenizer))
        _TURN_ENDS[tokenizer] = cached
    turn = cached[1]
    return None if turn is None else (turn[0], list(turn[1]))


_TURN_ENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _template_turn_end(tokenizer: Any) -> tuple[int, list[int]] | None:
    turn = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": TURN_PROBE}]
    try:
        text = render(tokenizer, turn, add_generation_prompt=False)
    except PactError:  # a template that cannot render an assistant turn has no end-of-turn token to find
        return None
    at = text.rfind(TURN_PROBE)
    if at < 0:
        return None
    suffix = tokenize(tokenizer, text[at + len(TURN_PROBE) :].lstrip(" "))
    if suffix and suffix[0] in set(special_token_ids(tokenizer).values()):
        return suffix[0], suffix[1:]
    return None


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def end_of_turn_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Ids that end an assistant turn, sorted: the tokenizer's eos, the chat template's
    end-of-turn special token and, when given, the generation config's eos (one id or
    a list). Generation stops at any of them; the encoding's labels stop at the one the
    template writes (`template_turn_end`)."""
    ids = _as_ids(tokenizer.eos_token_id) + _as_ids(getattr(generation_config, "eos_token_id", None))
    turn = template_turn_end(tokenizer)
    if turn is not None:
        ids.append(turn[0])
    return sorted(set(ids))


def through_end_of_turn(response_ids: list[int], turn: tuple[int, list[int]] | None) -> list[int]:
    """The response ids through the template's end-of-turn token: its trailing ids
    (`template_turn_end`) dropped, else everything after the last end-of-turn id;
    unchanged when the template has no end-of-turn token or the response holds none."""
    if turn is None:
        return response_ids
    end, trailing = turn
    cut = len(response_ids) - len(trailing)
    if cut > 0 and response_ids[cut - 1] == end and response_ids[cut:] == trailing:
        return response_ids[:cut]
    last = max((i for i, t in enumerate(response_ids) if t == end), default=None)
    return response_ids if last is None else response_ids[: last + 1]


def max_token_bytes(tokenizer: Any) -> int:
    """An upper bound on the UTF-8 bytes one token decodes to: 4 x the longest vocabulary
    entry in characters (byte-level BPE writes one character per byte, SentencePiece at
    most 4 bytes per character). Cached on the tokenizer."""
    cached = getattr(tokenizer, "_pact_max_token_bytes", None)
    if cached is None:
        cached = 4 * max((len(token) for token in tokenizer.get_vocab()), default=1)
        tokenizer._pact_max_token_bytes = cached
    return cached


def check_prompt_size(tokenizer: Any, example_id: str, prompt_text: str, max_length: int) -> None:
    """PactError, before any tokenisation, for a prompt too long to fit `max_length` tokens
    whatever the tokenizer does (a 50 MB prompt took 9 GB and 93 s to tokenise first)."""
    limit = max_length * max_token_bytes(tokenizer)
    if len(prompt_text) > limit or len(prompt_text.encode("utf-8", "surrogatepass")) > limit:
        raise PactError(
            f"example {example_id}: the prompt has {len(prompt_text)} characters, more than "
            f"max_length {max_length} tokens can hold (at most {limit} bytes with this tokenizer)"
        )


def encode_example(tokenizer: Any, example: Example, options: EncodingOptions) -> Encoded:
    """Encode one example through the chat template (see module docstring)."""
    messages = [dict(m) for m in example.messages]
    prompt_text = render(tokenizer, messages, add_generation_prompt=True)
    full_text = render(tokenizer, messages + [{"role": "assistant", "content": example.response}], False)
    if not full_text.startswith(prompt_text):
        raise PactError(
            f"example {example.example_id}: the chat template's prompt rendering is not a prefix "
            "of the full conversation; pact cannot locate the response"
        )
    check_prompt_size(tokenizer, example.example_id, prompt_text, options.max_length)
    prompt_ids = tokenize(tokenizer, prompt_text)
    # A response far longer than the room left is tokenised only as far as it is kept; its
    # end-of-turn token lies past the cut then, so cutting there changes no kept token.
    room_left = max(1, options.max_length - len(prompt_ids))
    response_ids, whole = leading_token_ids(tokenizer, full_text[len(prompt_text) :], room_left)
    if whole and not options.label_after_end_of_turn:
        response_ids = through_end_of_turn(response_ids, template_turn_end(tokenizer))
    if not prompt_ids:
        raise PactError(f"example {example.example_id}: the response starts at position 0 (empty prompt encoding)")
    if not response_ids:
        raise PactError(f"example {example.example_id}: the response encodes to no tokens")
    room = options.max_length - len(prompt_ids)
    if room < 1:
        raise PactError(
            f"example {example.example_id}: the prompt has {len(prompt_ids)} tokens, leaving no room "
            f"for the response within max_length {options.max_length}"
        )
    truncated = len(response_ids) > room or not whole
    response_ids = response_ids[:room]
    input_ids = np.asarray(prompt_ids + response_ids, dtype=np.int64)
    labels = input_ids.copy()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return Encoded(
        example_id=example.example_id,
        input_ids=input_ids,
        labels=labels,
        response_start=len(prompt_ids),
        response_length=len(response_ids),
        token_hash=hash_ids(input_ids),
        response_hash=hash_ids(response_ids),
        truncated=truncated,
    )


def assistant_header_text(tokenizer: Any) -> str:
    """What add_generation_prompt adds on a dummy user turn; `Assistant:` when blank.
    A template that ends a conversation with eos instead (Phi-3) is compared without it."""
    without = render(tokenizer, DUMMY_TURN, add_generation_prompt=False)
    with_prompt = render(tokenizer, DUMMY_TURN, add_generation_prompt=True)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and not with_prompt.startswith(without) and without.endswith(eos):
        without = without[: -len(eos)]
    header = with_prompt[len(without) :] if with_prompt.startswith(without) else ""
    return header if header.strip() else HEADER_FALLBACK


def assistant_header_ids(tokenizer: Any) -> list[int]:
    """The assistant header tokenized on its own, without special tokens."""
    ids = tokenize(tokenizer, assistant_header_text(tokenizer))
    if not ids:
        raise PactError("the assistant header encodes to no tokens; tokenizer and template are incompatible")
    return ids


def post_only_ids(header_ids: list[int], response_ids: Any) -> tuple[np.ndarray, int]:
    """Post-only context header + response[:-1] and the position of step 0 (len(header) - 1)."""
    ids = np.concatenate([np.asarray(header_ids, dtype=np.int64), np.asarray(response_ids, dtype=np.int64)[:-1]])
    return ids, len(header_ids) - 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the vocabulary and special tokens (not the template)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "added": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
    }
    payload = json.dumps([vocab, specials], ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:16]


def template_fingerprint(tokenizer: Any) -> str:
    return hashlib.sha256(chat_template(tokenizer).encode("utf-8")).hexdigest()[:16]


def encoding_fingerprints(tokenizer: Any, options: EncodingOptions) -> dict[str, Any]:
    """Everything that decides the token ids, as recorded in the manifest."""
    return {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": template_fingerprint(tokenizer),
        "assistant_header": assistant_header_text(tokenizer),
        "encoding": options.to_dict(),
    }
