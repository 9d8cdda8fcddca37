"""Loading local models and tokenizers, devices and dtypes, and model fingerprints.

Weights load only from safetensors (no pickle); `trust_remote_code` stays off
unless the caller passes it explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pact.core.errors import PactError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PARTIAL_WEIGHTS_FLAG = "--allow-partial-weights"
PARTIAL_WEIGHTS_HELP = (
    "Load a model whose weights do not fill the model its config.json describes (missing weights "
    "stay at random init, unexpected ones are dropped), with a warning, instead of refusing it."
)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; PactError for anything but auto, cpu,
    cuda or cuda:<index>, and for CUDA where there is none."""
    import torch

    from pact.core.config import check_device

    check_device(device, "device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PactError(f"device {device!r} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """Torch dtype for a name; 'auto' is bfloat16 on CUDA and float32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise PactError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def check_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path; PactError `<what> path ... does not exist / is not a directory`,
    or when one of its files is not a regular file (a FIFO, a device such as /dev/zero,
    a broken link: reading it would hang or fail deep inside a loader)."""
    path = Path(path)
    if not path.exists():
        raise PactError(f"{what} path {path} does not exist")
    if not path.is_dir():
        raise PactError(f"{what} path {path} is not a directory (expected a local model directory)")
    for entry in path.iterdir():
        try:
            mode = entry.stat().st_mode  # through links: a hub cache links its files to blobs
        except OSError:
            raise PactError(f"{what} file {entry} is a broken link or cannot be read") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise PactError(f"{what} file {entry} is not a regular file (a device, FIFO or socket); refusing to read it")
    return path


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local directory, with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    path = check_dir(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PactError(f"cannot load a tokenizer from {path}: {_first_line(exc)}") from None
    except Exception as exc:  # malformed tokenizer files surface as KeyError, TypeError, tokenizers' Exception
        raise PactError(
            f"cannot load a tokenizer from {path}: its tokenizer files are malformed "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise PactError(f"tokenizer at {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors weight files of a model directory; PactError when there are none."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(pickles)}: pact loads safetensors only, no pickle)" if pickles else ""
        raise PactError(f"model directory {path} has no *.safetensors weights{hint}")
    return files


# transformers' from_pretrained swaps class attributes for the length of a load
# (`PreTrainedModel.tie_weights` and `init_weights` by no-ops) and its logging verbosity,
# and restores them after: two loads in threads interleave the swaps and can leave them
# swapped for the rest of the process (tied heads built untied, weights left
# uninitialised). One load at a time per process.
_LOAD_LOCK = threading.Lock()


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_partial_weights: bool = False,
) -> Any:
    """A causal LM from a local directory of safetensors weights, in eval mode on `device`.

    Refused with one line: weights that do not fill the model its config.json describes
    (unless `allow_partial_weights`: then one `warning: ...` line on stderr), NaN or inf in
    any weight, any load failure."""
    from transformers import AutoModelForCausalLM

    path = check_dir(path, "model")
    weight_files(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        with _LOAD_LOCK, _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                output_loading_info=True, ignore_mismatched_sizes=True,
            )  # fmt: skip
    except Exception as exc:  # a bad checkpoint surfaces as any of a dozen types, all one line here
        raise PactError(f"cannot load a model from {path}: {_first_line(exc)}") from None
    mismatch = loading_mismatch(path, info, model)
    if mismatch is not None and not allow_partial_weights:
        raise PactError(f"{mismatch}; {PARTIAL_WEIGHTS_FLAG} loads it anyway")
    if mismatch is not None:
        print(f"warning: {mismatch}; loaded anyway ({PARTIAL_WEIGHTS_FLAG})", file=sys.stderr, flush=True)
    if not trust_remote_code and getattr(model.config, "auto_map", None):  # kept from config.json
        print(
            f"warning: {path}/config.json names custom model code (auto_map); it was not run: transformers' "
            f"own {type(model).__name__} was loaded (--trust-remote-code runs it)",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    model = model.to(device).eval()
    check_finite_weights(path, model)
    return model


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load report (a multi-line table) and its `Loading weights` progress
    bar off while loading: pact says what went wrong in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _tied(model: Any, names: set[str]) -> set[str]:
    """The parameters among `names` that share their storage with a parameter outside
    `names` (an LM head tied to the input embeddings is stored once, under the latter)."""
    if model is None:
        return set()
    loaded = {p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False) if n not in names}
    tied = set()
    for name in names:
        try:
            parameter = model.get_parameter(name)
        except (AttributeError, ValueError):
            continue
        if parameter.data_ptr() in loaded:
            tied.add(name)
    return tied


def loading_mismatch(path: Path, info: dict[str, Any], model: Any = None) -> str | None:
    """One line saying how the weights do not fill the model config.json describes:
    weights missing (left at random init; a head tied to the embeddings is not missing),
    unexpected (unused), or of another shape; None when they fill it."""
    parts = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "of another shape")):
        names = {str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or []}
        if key == "missing_keys":
            names -= _tied(model, names)
        names = sorted(names)
        if names:
            parts.append(f"{len(names)} {label} (first: {names[0]})")
    if not parts:
        return None
    return (
        f"the weights in {path} do not match its config.json: {'; '.join(parts)} "
        "(another model's config, or a cut checkpoint?)"
    )


def check_loading_info(path: Path, info: dict[str, Any], model: Any = None) -> None:
    """PactError when the weights do not fill the model config.json describes
    (`loading_mismatch`)."""
    mismatch = loading_mismatch(path, info, model)
    if mismatch is not None:
        raise PactError(mismatch)


def check_finite_weights(path: str | os.PathLike, model: Any) -> None:
    """PactError naming the first parameter that holds NaN or inf."""
    import torch

    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all()):
            raise PactError(f"the weights in {path} hold NaN or inf (first in {name}); refusing to use them")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime, ctime, device, inode) under
    PACT_CACHE_DIR or ~/.cache/pact."""
    info = path.stat()
    # ctime and inode too: an in-place edit that restores the mtime still changes the ctime
    key = f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}|{info.st_ctime_ns}|{info.st_dev}|{info.st_ino}"
    cache_dir = Path(os.environ.get("PACT_CACHE_DIR", Path.home() / ".cache" / "pact"))
    cache_file = cache_dir / "file_hashes.json"
    cache: dict[str, str] = {}
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    cache[key] = file_sha256(path)
    try:
        from pact.core.atomic import atomic_write_bytes

        atomic_write_bytes(cache_file, json.dumps(cache).encode())
    except OSError:
        pass
    return cache[key]


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The model directory's config.json as a dict."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise PactError(f"model directory {path} has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PactError(f"{config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PactError(f"{config_file} is not a JSON object")
    return config


def context_length(path: str | os.PathLike) -> int | None:
    """The model's context window in tokens, as its config.json states it (None if it
    names none): `max_position_embeddings`, `n_positions`, `max_sequence_length` or
    `seq_length`, whichever comes first (a text model's nested `text_config` too)."""
    config = _read_config(path)
    for section in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def past_context_warning(path: str | os.PathLike, lengths: list[int], what: str) -> str | None:
    """A one-line warning when some of `lengths` (tokens per encoded example) exceed the
    context window of the model at `path`, else None."""
    limit = context_length(path)
    longer = 0 if limit is None else sum(1 for n in lengths if n > limit)
    if not longer:
        return None
    return (
        f"warning: {longer} of {len(lengths)} {what} are longer than the model's context window "
        f"({limit} tokens, config.json): positions past it are outside what the model was trained "
        f"on; --max-length {limit} keeps them within it (the response tail is cut; --skip-invalid "
        "drops those whose prompt alone is longer)"
    )


def config_fingerprint(path: str | os.PathLike) -> str:
    """Hash of config.json without volatile keys (paths, library versions, dtype)."""
    config = _read_config(path)
    config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(path: str | os.PathLike) -> str:
    """Hash of the config and of every safetensors weight file of a model directory."""
    path = check_dir(path, "model")
    digest = hashlib.sha256(config_fingerprint(path).encode())
    for file in weight_files(path):
        digest.update(file.name.encode())
        digest.update(_cached_file_sha256(file).encode())
    return digest.hexdigest()[:16]
