"""Win rate and length-controlled win rate with alpaca_eval's own metrics; the LC computation that produced a
number is always named (``lc_method``), since numbers from different methods are not comparable."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

logger = logging.getLogger(__name__)

LC_GLM_NAME = "length_controlled_v1"
GAMED_FILE = "df_gamed.csv"
DIFFICULTY_FILE = "instruction_difficulty.csv"
#: A file with one of these names in an assets directory marks its contents as approximate (not official).
APPROXIMATE_MARKER_FILES = ("APPROXIMATE", "APPROXIMATE.txt", ".approximate")
#: Directory-name fragments that say the same.
APPROXIMATE_NAME_FRAGMENTS = ("reconstruct", "approx")
#: alpaca_eval's GLM cross-validates over 5 folds of instructions; fewer rows cannot be fitted.
MIN_ROWS_FOR_LC = 5
#: The formula alpaca_eval calls ``length_controlled_minimal``: length term and model term only.
NO_DIFFICULTY_FORMULA = "np.tanh(std_delta_len) + not_gamed_baseline.astype(float) - 1"
REQUIRED_ANNOTATION_FIELDS = ("instruction", "output_1", "output_2", "generator_1", "generator_2", "preference")

_REDIRECT_LOCK = threading.Lock()


class AnnotationsError(ValueError):
    """Annotations that cannot be scored (missing fields, bad preferences, several generators)."""


class LcAssetsError(ValueError):
    """An LC assets directory that lacks the files the GLM needs."""


def is_approximate_assets(directory: Path) -> bool:
    """Whether a directory's name or a marker file says its LC assets are not the official ones."""
    name = directory.resolve().name.lower()
    return any(f in name for f in APPROXIMATE_NAME_FRAGMENTS) or any(
        (directory / marker).exists() for marker in APPROXIMATE_MARKER_FILES
    )


@contextlib.contextmanager
def glm_downloads_served_by(resolve: Callable[[str], Any]) -> Iterator[None]:
    """Within the block, alpaca_eval's GLM gets ``resolve(filename)`` instead of a Hub download.

    ``resolve`` returns anything ``pandas.read_csv`` reads (a path or a text buffer). The original function
    is restored on exit; a lock keeps two threads from redirecting at once.
    """
    from alpaca_eval.metrics import glm_winrate

    def served(repo_id: str, filename: str, **_: Any) -> Any:
        return resolve(filename)

    with _REDIRECT_LOCK:
        original = glm_winrate.hf_hub_download
        glm_winrate.hf_hub_download = served
        try:
            yield
        finally:
            glm_winrate.hf_hub_download = original


def _local_resolver(directory: Path) -> Callable[[str], str]:
    def resolve(filename: str) -> str:
        path = directory / filename
        if not path.is_file():
            raise LcAssetsError(f"{directory}: no {filename} (alpaca_eval's LC GLM asked for it)")
        return str(path)

    return resolve


def _no_assets_resolver(n_rows: int) -> Callable[[str], io.StringIO]:
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


def _hub_assets_available() -> bool:
    """Whether alpaca_eval's own download of ``df_gamed.csv`` works here (online, or in the HF cache)."""
    from alpaca_eval import constants
    from alpaca_eval.metrics import glm_winrate

    try:
        glm_winrate.hf_hub_download(
            repo_id="tatsu-lab/alpaca_eval", filename=GAMED_FILE, repo_type="dataset",
            token=constants.DATASETS_TOKEN, cache_dir=constants.DEFAULT_CACHE_DIR,
        )
    except Exception as exc:  # offline, not cached, network or auth errors
        logger.info("LC assets not available from the Hub (%s: %s)", type(exc).__name__, exc)
        return False
    return True


def annotations_frame(annotations: Sequence[dict[str, Any]], source: str = "annotations"):
    """A DataFrame in row order (row position = instruction index) with float preferences (NaN = missing)."""
    import pandas as pd

    if not isinstance(annotations, (list, tuple)) or not annotations:
        raise AnnotationsError(f"{source}: expected a non-empty list of annotation records")
    for index, row in enumerate(annotations):
        if not isinstance(row, dict):
            raise AnnotationsError(f"{source}: record {index} is a {type(row).__name__}, expected an object")
        missing = [k for k in REQUIRED_ANNOTATION_FIELDS if k not in row]
        if missing:
            raise AnnotationsError(f"{source}: record {index} lacks {missing}; alpaca_eval annotations need "
                                   f"{', '.join(REQUIRED_ANNOTATION_FIELDS)}")
        pref = row["preference"]
        if pref is not None and not isinstance(pref, (int, float)):
            raise AnnotationsError(f"{source}: record {index} preference {pref!r} is not a number or null")
        if pref is not None and not math.isnan(pref) and not (1.0 <= pref <= 2.0 or pref == 0.0):
            raise AnnotationsError(f"{source}: record {index} preference {pref} is outside [1, 2] "
                                   f"(1 = output_1 wins, 2 = output_2 wins, 1.5 or 0 = draw)")
    df = pd.DataFrame(
        [{k: row[k] for k in REQUIRED_ANNOTATION_FIELDS} | {"annotator": row.get("annotator", "unknown")}
         for row in annotations]
    )
    df["preference"] = pd.to_numeric(df["preference"], errors="coerce").astype(float)
    for column in ("generator_1", "generator_2"):
        values = df[column].unique()
        if len(values) != 1:
            raise AnnotationsError(f"{source}: {column} must be one generator, found {list(values)[:5]}; "
                                   f"score one model against one reference at a time")
    return df


def lc_method_label(*, subset: bool, gamed_regularisation: bool, instruction_difficulty: bool,
                    assets: str | None, approximate: bool) -> str:
    """The name of the LC computation, e.g. ``length_controlled_v1 (approximate assets: DIR)``."""
    label = LC_GLM_NAME
    if subset:
        label += "_subset"
    if not gamed_regularisation:
        label += "_no_gamed_regularisation"
    if not instruction_difficulty:
        label += "_no_instruction_difficulty"
    if assets is not None and assets != "hub":
        label += f" ({'approximate assets' if approximate else 'assets'}: {assets})"
    return label


def score(
    annotations: Sequence[dict[str, Any]],
    lc_assets_dir: str | Path | None = None,
    subset: bool = False,
    alpaca_eval_order: bool = True,
    use_hub: bool = True,
    source: str = "annotations",
) -> dict[str, Any]:
    """WR, LC WR and counts for one model against one reference, with the LC method named in ``lc_method``.

    WR is ``alpaca_eval.metrics.get_winrate`` (reproduces the leaderboard exactly). LC is its
    ``get_length_controlled_winrate``: the ``length_controlled_v1`` GLM needs ``df_gamed.csv`` (two length-gamed
    baselines it regularises towards) and ``instruction_difficulty.csv``, which alpaca_eval fetches from the Hub at
    call time; offline they come from a local directory, served by redirecting its download function. Without
    them the same GLM is fitted without the gamed-baseline regularisation and without instruction difficulty.

    ``alpaca_eval_order``: row i is AlpacaEval instruction i, so the per-instruction difficulty and the
    gamed baselines apply; when False (another instruction set) LC uses neither. ``lc_assets_dir`` holds
    ``df_gamed.csv`` (and ``instruction_difficulty.csv``); when None, alpaca_eval's Hub download is tried
    (``use_hub``), and failing that LC is computed without the assets. ``subset``: the rows are a prefix of
    the eval set, which the label records.
    """
    import sklearn
    from alpaca_eval.metrics import get_length_controlled_winrate, get_winrate
    from alpaca_eval.metrics.glm_winrate import GLM_INFO

    df = annotations_frame(annotations, source)
    metrics: dict[str, Any] = dict(get_winrate(df))
    metrics["avg_length"] = int(df["output_2"].astype(str).str.len().mean())  # as alpaca_eval's leaderboard

    n_valid = int(df["preference"].notna().sum())
    assets: str | None = None
    approximate = False
    resolver: Callable[[str], Any] | None = None
    full_glm = False
    if alpaca_eval_order:
        if lc_assets_dir is not None:
            directory = Path(lc_assets_dir)
            if not (directory / GAMED_FILE).is_file():
                raise LcAssetsError(f"LC assets directory {directory} has no {GAMED_FILE}; give a directory "
                                    f"with {GAMED_FILE} and {DIFFICULTY_FILE}, or none to score without them")
            assets, approximate, full_glm = str(directory), is_approximate_assets(directory), True
            resolver = _local_resolver(directory)
        elif use_hub and _hub_assets_available():
            assets, full_glm = "hub", True
    elif lc_assets_dir is not None:
        logger.warning("ignoring LC assets %s: the rows are not AlpacaEval's instructions in order, so the "
                       "per-instruction difficulty and gamed baselines do not apply", lc_assets_dir)

    metrics["lc_method"] = lc_method_label(subset=subset, gamed_regularisation=full_glm,
                                           instruction_difficulty=full_glm, assets=assets, approximate=approximate)
    metrics["lc_assets"] = assets
    metrics["lc_approximate_assets"] = approximate
    if n_valid < MIN_ROWS_FOR_LC:
        metrics["length_controlled_winrate"] = None
        metrics["lc_standard_error"] = None
        metrics["lc_method"] = f"unavailable: {n_valid} annotations, the GLM needs at least {MIN_ROWS_FOR_LC}"
    else:
        if full_glm:
            glm_info = GLM_INFO[LC_GLM_NAME]
        else:
            glm_info = {"formula": NO_DIFFICULTY_FORMULA, "regularize_to_baseline_lambda": None,
                        "kwargs": dict(GLM_INFO[LC_GLM_NAME]["kwargs"])}
            resolver = _no_assets_resolver(len(df))
        redirect = glm_downloads_served_by(resolver) if resolver is not None else contextlib.nullcontext()
        # alpaca_eval turns on sklearn metadata routing globally; config_context puts the setting back.
        with redirect, sklearn.config_context(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            lc = get_length_controlled_winrate(df.copy(), glm_name=LC_GLM_NAME, save_weights_dir=None,
                                               glm_info=glm_info, is_warn_extreme_changes=True)
        metrics["length_controlled_winrate"] = lc["length_controlled_winrate"]
        metrics["lc_standard_error"] = lc["lc_standard_error"]

    out = {k: _plain(v) for k, v in metrics.items()}
    logger.info("scored %d annotations: WR %.4f, LC %s (%s)", len(df), out["win_rate"],
                out["length_controlled_winrate"], out["lc_method"])
    return out


def _plain(value: Any) -> Any:
    """numpy scalars to Python numbers (NaN to None) so the result serialises to JSON."""
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
