"""The one place PrefFlow reaches inside alpaca_eval: its length-controlled GLM downloads two asset files from the
Hub at call time, and this adapter serves them from elsewhere for one call (checked against the installed library
before every use, so a changed alpaca_eval fails loudly instead of silently reaching the Hub)."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GLM_MODULE = "alpaca_eval.metrics.glm_winrate"
#: The module global the GLM calls to fetch its assets; the adapter replaces it for the duration of one fit.
REDIRECTED_FUNCTION = "hf_hub_download"
#: Functions of GLM_MODULE that call REDIRECTED_FUNCTION, and the public entry point that reaches the first.
ASSET_READERS = ("_get_featurized_data", "_get_instructions_difficulty")
ENTRY_POINT = "get_length_controlled_winrate"
#: Keyword arguments the GLM passes to the download function; the stand-in serves by ``filename``.
EXPECTED_PARAMETERS = ("repo_id", "filename", "repo_type", "token", "cache_dir")
GAMED_FILE = "df_gamed.csv"
DIFFICULTY_FILE = "instruction_difficulty.csv"

_REDIRECT_LOCK = threading.Lock()


class LcAssetsError(ValueError):
    """An LC assets directory that lacks the files the GLM needs."""


class GlmInterfaceError(RuntimeError):
    """The installed alpaca_eval no longer fetches its GLM assets the way this adapter redirects."""


def check_glm_interface() -> None:
    """Raise GlmInterfaceError unless alpaca_eval still fetches its assets through ``glm_winrate.hf_hub_download``.

    Checks that the module global exists and takes the expected keywords, that ``_get_featurized_data`` looks it
    up by that name at call time (so replacing the module attribute redirects it), and that
    ``get_length_controlled_winrate`` calls ``_get_featurized_data``.
    """
    from alpaca_eval.metrics import glm_winrate

    def fail(what: str) -> GlmInterfaceError:
        import alpaca_eval

        return GlmInterfaceError(
            f"alpaca_eval {getattr(alpaca_eval, '__version__', '?')}: {what}; steps/evaluate/lc_glm.py serves the "
            f"LC assets by replacing {GLM_MODULE}.{REDIRECTED_FUNCTION} and needs updating for this version "
            f"(pinned and checked: alpaca-eval 0.6.6)"
        )

    download = getattr(glm_winrate, REDIRECTED_FUNCTION, None)
    if not callable(download):
        raise fail(f"{GLM_MODULE} has no callable {REDIRECTED_FUNCTION}")
    try:
        parameters = inspect.signature(download).parameters
    except (TypeError, ValueError) as exc:
        raise fail(f"cannot read the signature of {REDIRECTED_FUNCTION} ({exc})") from exc
    missing = [p for p in EXPECTED_PARAMETERS if p not in parameters]
    if missing:
        raise fail(f"{REDIRECTED_FUNCTION} no longer takes {missing}")
    for name in ASSET_READERS:
        reader = getattr(glm_winrate, name, None)
        if reader is None or REDIRECTED_FUNCTION not in reader.__code__.co_names:
            raise fail(f"{name} no longer calls the module global {REDIRECTED_FUNCTION}")
    entry = getattr(glm_winrate, ENTRY_POINT, None)
    if entry is None or ASSET_READERS[0] not in entry.__code__.co_names:
        raise fail(f"{ENTRY_POINT} no longer calls {ASSET_READERS[0]}")


@contextlib.contextmanager
def glm_downloads_served_by(resolve: Callable[[str], Any]) -> Iterator[None]:
    """Within the block, alpaca_eval's GLM gets ``resolve(filename)`` instead of a Hub download.

    ``resolve`` returns anything ``pandas.read_csv`` reads (a path or a text buffer). The original function is
    restored on exit; a lock keeps two threads from redirecting at once.
    """
    from alpaca_eval.metrics import glm_winrate

    check_glm_interface()

    def served(repo_id: str, filename: str, **_: Any) -> Any:
        return resolve(filename)

    with _REDIRECT_LOCK:
        original = getattr(glm_winrate, REDIRECTED_FUNCTION)
        setattr(glm_winrate, REDIRECTED_FUNCTION, served)
        try:
            yield
        finally:
            setattr(glm_winrate, REDIRECTED_FUNCTION, original)


def local_resolver(directory: Path) -> Callable[[str], str]:
    """Serve the assets from a directory holding ``df_gamed.csv`` and ``instruction_difficulty.csv``."""

    def resolve(filename: str) -> str:
        path = directory / filename
        if not path.is_file():
            raise LcAssetsError(f"{directory}: no {filename} (alpaca_eval's LC GLM asked for it)")
        return str(path)

    return resolve


def no_assets_resolver(n_rows: int) -> Callable[[str], io.StringIO]:
    """A stand-in for ``df_gamed.csv`` with no gamed rows and unknown (NaN) difficulty for rows 0..n-1.

    Only used with no regularisation and a formula without instruction difficulty, where alpaca_eval reads
    nothing from this file but the (then unused) difficulty column.
    """

    def resolve(filename: str) -> io.StringIO:
        if filename != GAMED_FILE:
            raise LcAssetsError(f"no LC assets available, and alpaca_eval's GLM asked for {filename}")
        rows = "".join(f"none,{i},\n" for i in range(n_rows))
        return io.StringIO("model,index,instruction_difficulty\n" + rows)

    return resolve


def hub_assets_available() -> bool:
    """Whether alpaca_eval's own download of ``df_gamed.csv`` works here (online, or in the HF cache)."""
    from alpaca_eval import constants
    from alpaca_eval.metrics import glm_winrate

    try:
        getattr(glm_winrate, REDIRECTED_FUNCTION)(
            repo_id="tatsu-lab/alpaca_eval",
            filename=GAMED_FILE,
            repo_type="dataset",
            token=constants.DATASETS_TOKEN,
            cache_dir=constants.DEFAULT_CACHE_DIR,
        )
    except Exception as exc:  # offline, not cached, network or auth errors
        logger.info("LC assets not available from the Hub (%s: %s)", type(exc).__name__, exc)
        return False
    return True


def fit_length_controlled(
    frame: Any, glm_name: str, glm_info: dict[str, Any], resolver: Callable[[str], Any] | None
) -> tuple[float, float, list[float]]:
    """alpaca_eval's ``get_length_controlled_winrate`` on a copy of ``frame``: (LC, its s.e., per-row GLM preference).

    The per-row predictions come through the public ``is_add_glm_preference_inplace`` option; they tell a fit
    that shrank to the constant (every prediction exactly 0.5) from a real one.
    """
    import sklearn
    from alpaca_eval.metrics import get_length_controlled_winrate

    work = frame.copy()
    redirect = glm_downloads_served_by(resolver) if resolver is not None else contextlib.nullcontext()
    # alpaca_eval turns on sklearn metadata routing globally; config_context puts the setting back.
    with redirect, sklearn.config_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lc = get_length_controlled_winrate(
            work,
            glm_name=glm_name,
            save_weights_dir=None,
            glm_info=glm_info,
            is_add_glm_preference_inplace=True,
            is_warn_extreme_changes=True,
        )
    return (
        float(lc["length_controlled_winrate"]),
        float(lc["lc_standard_error"]),
        [float(p) for p in work["glm_preference"]],
    )
