"""The `--model` checkpoint every command loads, checked before anything loads.

Each command that takes a checkpoint (bench, generate, eval, env, plan) goes through these
functions, so that a path that doesn't exist, a folder that isn't a checkpoint, a config.json that
doesn't parse or a truncated weights file is refused in one line that names the path and what is
wrong with it (`CliError`, which `main()` prints with exit status 2), never as Transformers' or the
Hub client's chained tracebacks. The cheap checks (files present, config.json parses, each
safetensors file as long as its header says) run before any weights are read, so a bad checkpoint
fails at once, not after minutes of loading; whatever they can't see is caught around
`from_pretrained` and reported the same way.

A `--model` that is no local path but reads as a Hub repository id (`org/name`) is handed to
`from_pretrained` unchanged: downloading a checkpoint stays possible, and its failure is one line.
Paths are taken as `from_pretrained` takes them (no `~` expansion), so both see the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)


class CliError(ValueError):
    """A bad command-line input: `main()` prints its message as one line and exits with status 2."""


# Loading failures that mean "this checkpoint can't be read", as opposed to a bug of ours. The
# safetensors reader raises its own exception class, which derives from Exception only.
def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError)


# The files AutoTokenizer builds a tokenizer from; a folder with none of them has no tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model", "tekken.json")
_SAFETENSORS_HEADER_BYTES = 8  # the little-endian length of the JSON header that starts the file
_FOLDER_HINT = f"expected a Hugging Face checkpoint folder, with {CONFIG_NAME} beside {SAFE_WEIGHTS_NAME} or its shards"


def one_line(error: BaseException) -> str:
    """An exception's message on one line (Transformers' messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _is_hub_id(spec: str) -> bool:
    """True when `spec` is no local path but could name a Hub repository ("org/name" or "name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if spec.startswith(("/", ".", "~")) or "\\" in spec:
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def check_checkpoint(spec: str, *, weights: bool = True, tokenizer: bool = False) -> None:
    """Refuse a `--model` that can't load, naming the path and what's missing or broken (CliError).

    `weights`: the command loads the weights (not only the config); `tokenizer`: it needs the
    checkpoint's tokenizer. A Hub repository id that isn't a local path passes unchecked."""
    path = Path(spec)
    if not path.exists():
        if _is_hub_id(spec):
            return
        raise CliError(f"--model {spec}: no such folder; {_FOLDER_HINT}")
    if not path.is_dir():
        raise CliError(f"--model {spec} is a file; {_FOLDER_HINT}")
    config = path / CONFIG_NAME
    if not config.is_file():
        raise CliError(f"--model {spec}: no {CONFIG_NAME} in this folder; {_FOLDER_HINT}")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"{config}: can't read it ({one_line(error)})") from None
    except json.JSONDecodeError as error:
        raise CliError(f"{config} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): "
                       "restore it from the checkpoint's source") from None
    if not isinstance(data, dict):
        raise CliError(f"{config} holds a JSON {type(data).__name__}, not the object of a model config: "
                       "restore it from the checkpoint's source")
    if weights:
        _check_weights(path)
    if tokenizer and not any((path / name).is_file() for name in _TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise CliError(f"--model {spec}: no tokenizer files in this folder ({', '.join(_TOKENIZER_FILES[:2])}, ...); "
                       "this command needs the checkpoint's tokenizer beside its weights")


def _check_weights(folder: Path) -> None:
    """The weights from_pretrained would read are there, and each safetensors file is whole."""
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        _check_safetensors(folder / SAFE_WEIGHTS_NAME)
    elif (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        for shard in _index_shards(folder / SAFE_WEIGHTS_INDEX_NAME):
            _check_safetensors(shard)
    elif (folder / WEIGHTS_NAME).is_file():
        return  # a pickled state dict: only loading it can tell it is whole
    elif (folder / WEIGHTS_INDEX_NAME).is_file():
        _index_shards(folder / WEIGHTS_INDEX_NAME)
    else:
        raise CliError(f"{folder}: no weights in this folder (expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} "
                       f"with its shards, or {WEIGHTS_NAME}); download the checkpoint's weights beside its {CONFIG_NAME}")


def _index_shards(index: Path) -> list[Path]:
    """The shard files a weights index names, each of which must exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CliError(f"{index} is not a readable weights index ({one_line(error)}): restore it from the checkpoint's source") from None
    shards = [index.parent / name for name in names]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise CliError(f"{index} names {len(missing)} shard(s) missing from the folder ({', '.join(missing[:3])}"
                       f"{', ...' if len(missing) > 3 else ''}): download them beside it")
    return shards


def _check_safetensors(file: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range,
    then the data: a file shorter than its header says was cut off (an interrupted download or copy).
    Reads the header only."""
    size = file.stat().st_size
    fix = "download it again"
    try:
        with open(file, "rb") as f:
            head = f.read(_SAFETENSORS_HEADER_BYTES)
            if len(head) < _SAFETENSORS_HEADER_BYTES:
                raise CliError(f"{file} is truncated ({size} bytes, shorter than a safetensors header): {fix}")
            header_len = int.from_bytes(head, "little")
            if header_len > size - _SAFETENSORS_HEADER_BYTES:
                raise CliError(f"{file} is truncated or not a safetensors file ({size} bytes, its header alone "
                               f"claims {header_len}): {fix}")
            header = json.loads(f.read(header_len))
        data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise CliError(f"{file} is corrupt: its header is no safetensors header ({one_line(error)}): {fix}") from None
    expected = _SAFETENSORS_HEADER_BYTES + header_len + data_end
    if size < expected:
        raise CliError(f"{file} is truncated: {size} bytes where its header describes {expected}: {fix}")


def _failed(spec: str, what: str, error: BaseException) -> CliError:
    where = "" if Path(spec).exists() else " (no such folder here, so it was looked up on the Hugging Face Hub)"
    return CliError(f"--model {spec}: can't load {what}{where}: {one_line(error)}")


def load_config(spec: str):
    """The checkpoint's config (AutoConfig), checked first: one line on any failure."""
    from transformers import AutoConfig

    check_checkpoint(spec, weights=False)
    try:
        return AutoConfig.from_pretrained(spec)
    except _load_errors() as error:
        raise _failed(spec, "its config", error) from None


def load_tokenizer(spec: str, **kwargs):
    """The checkpoint's tokenizer (AutoTokenizer); call `check_checkpoint(spec, tokenizer=True)` first."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, **kwargs)
    except _load_errors() as error:
        raise _failed(spec, "its tokenizer", error) from None


def load_model(spec: str, **kwargs):
    """The checkpoint as AutoModelForCausalLM (in eval mode), checked first: one line on any failure.
    `kwargs` go to from_pretrained (dtype, device_map)."""
    from transformers import AutoModelForCausalLM

    check_checkpoint(spec)
    try:
        return AutoModelForCausalLM.from_pretrained(spec, **kwargs).eval()
    except _load_errors() as error:
        raise _failed(spec, "the model", error) from None
