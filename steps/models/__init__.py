"""Every model PrefFlow uses (policy, reference, judge) and its tokenizer, named by a spec string (see ``specs``).

Importing this package is cheap (no torch or transformers): each Metaflow step is a fresh process.
"""

from __future__ import annotations

from steps.models.cache import (
    CACHE_ENV_VAR,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    cache_dir,
    cache_problem,
    materialize_cached_dir,
    sha256_file,
    verify_cache,
    write_manifest,
)
from steps.models.embedded import (
    EmbeddedModelUnavailableError,
    embedded_model_dir,
    ensure_embedded_model,
)
from steps.models.gguf_files import GgufLoadError
from steps.models.load import load_model, model_summary
from steps.models.specs import (
    DEFAULT_EMBEDDED,
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    SPEC_KINDS,
    WHEEL_ENV_VAR,
    EmbeddedModel,
    ModelSource,
    ModelSpecError,
    resolve_model_spec,
)
from steps.models.tiny import TINY_CONFIG
from steps.models.tokenizers import load_tokenizer

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_EMBEDDED",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "SPEC_KINDS",
    "TINY_CONFIG",
    "WHEEL_ENV_VAR",
    "EmbeddedModel",
    "EmbeddedModelUnavailableError",
    "GgufLoadError",
    "ModelSource",
    "ModelSpecError",
    "cache_dir",
    "cache_problem",
    "embedded_model_dir",
    "ensure_embedded_model",
    "load_model",
    "load_tokenizer",
    "materialize_cached_dir",
    "model_summary",
    "resolve_model_spec",
    "sha256_file",
    "verify_cache",
    "write_manifest",
]
