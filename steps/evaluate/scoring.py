"""Win rate and length-controlled win rate with alpaca_eval's own metrics. The LC computation that produced a
number is always named (``lc_method``); where no meaningful LC exists it is None with ``lc_unavailable_reason``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.evaluate.lc_glm import (
    DIFFICULTY_FILE,
    GAMED_FILE,
    LcAssetsError,
    fit_length_controlled,
    hub_assets_available,
    local_resolver,
    no_assets_resolver,
)
from steps.evaluate.results import WinRates

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_INSTRUCTIONS_FOR_LC",
    "AnnotationsError",
    "LcAssetsError",
    "annotations_frame",
    "lc_method_label",
    "lc_unavailable_reason",
    "score",
]

LC_GLM_NAME = "length_controlled_v1"
#: A file with one of these names in an assets directory marks its contents as approximate (not official).
APPROXIMATE_MARKER_FILES = ("APPROXIMATE", "APPROXIMATE.txt", ".approximate")
#: Directory-name fragments that say the same.
APPROXIMATE_NAME_FRAGMENTS = ("reconstruct", "approx")
#: alpaca_eval's GLM picks its L1 strength by 5-fold cross-validation over instructions (GroupKFold). Below 5
#: instructions it cannot run at all; we ask for 10 instructions in every held-out fold, so the log-loss that
#: chooses the regularisation averages over 10 or more instructions and each training fold keeps 40 or more for
#: 2-3 coefficients. Measured on the official annotations (4 disjoint slices each, no assets): at 24 instructions
#: half of FuseChat's fits collapse to exactly 50 and alpaca-7b's LC spans 0.04-35 (805 rows: 19.6).
MIN_INSTRUCTIONS_FOR_LC = 50
#: Every GLM prediction within this of 0.5 means the regularised fit kept no coefficient: LC reads 50 regardless.
COLLAPSED_FIT_TOLERANCE = 1e-9
#: The formula alpaca_eval calls ``length_controlled_minimal``: length term and model term only.
NO_DIFFICULTY_FORMULA = "np.tanh(std_delta_len) + not_gamed_baseline.astype(float) - 1"
REQUIRED_ANNOTATION_FIELDS = ("instruction", "output_1", "output_2", "generator_1", "generator_2", "preference")


class AnnotationsError(ValueError):
    """Annotations that cannot be scored (missing fields, bad preferences, several generators)."""


def is_approximate_assets(directory: Path) -> bool:
    """Whether a directory's name or a marker file says its LC assets are not the official ones."""
    name = directory.resolve().name.lower()
    return any(f in name for f in APPROXIMATE_NAME_FRAGMENTS) or any(
        (directory / marker).exists() for marker in APPROXIMATE_MARKER_FILES
    )


def annotations_frame(annotations: Sequence[dict[str, Any]], source: str = "annotations") -> Any:
    """A DataFrame in row order (row position = instruction index) with float preferences (NaN = missing)."""
    import pandas as pd

    if not isinstance(annotations, (list, tuple)) or not annotations:
        raise AnnotationsError(f"{source}: expected a non-empty list of annotation records")
    for index, row in enumerate(annotations):
        if not isinstance(row, dict):
            raise AnnotationsError(f"{source}: record {index} is a {type(row).__name__}, expected an object")
        missing = [k for k in REQUIRED_ANNOTATION_FIELDS if k not in row]
        if missing:
            raise AnnotationsError(
                f"{source}: record {index} lacks {missing}; alpaca_eval annotations need "
                f"{', '.join(REQUIRED_ANNOTATION_FIELDS)}"
            )
        pref = row["preference"]
        if pref is not None and not isinstance(pref, (int, float)):
            raise AnnotationsError(f"{source}: record {index} preference {pref!r} is not a number or null")
        if pref is not None and not math.isnan(pref) and not (1.0 <= pref <= 2.0 or pref == 0.0):
            raise AnnotationsError(
                f"{source}: record {index} preference {pref} is outside [1, 2] "
                f"(1 = output_1 wins, 2 = output_2 wins, 1.5 or 0 = draw)"
            )
    df = pd.DataFrame(
        [
            {k: row[k] for k in REQUIRED_ANNOTATION_FIELDS} | {"annotator": row.get("annotator", "unknown")}
            for row in annotations
        ]
    )
    df["preference"] = pd.to_numeric(df["preference"], errors="coerce").astype(float)
    for column in ("generator_1", "generator_2"):
        values = df[column].unique()
        if len(values) != 1:
            raise AnnotationsError(
                f"{source}: {column} must be one generator, found {list(values)[:5]}; "
                f"score one model against one reference at a time"
            )
    return df


def lc_method_label(
    *, subset: bool, gamed_regularisation: bool, instruction_difficulty: bool, assets: str | None, approximate: bool
) -> str:
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


def lc_unavailable_reason(df: Any) -> str | None:
    """Why no length-controlled fit on these annotations can mean anything, or None when one can be tried.

    Checked before fitting, in this order: too few judged instructions (``MIN_INSTRUCTIONS_FOR_LC``), the model
    being its own reference, every judgement a tie, and a length difference that is the same on every row (the
    GLM divides it by its standard deviation: 0 or undefined gives NaN or constant features).
    """
    preferences = df["preference"].replace({0.0: 1.5})
    valid = preferences.dropna()
    if len(valid) < MIN_INSTRUCTIONS_FOR_LC:
        return (
            f"{len(valid)} judged instruction{'s' if len(valid) != 1 else ''}; the length-controlled GLM needs "
            f"at least {MIN_INSTRUCTIONS_FOR_LC} (5-fold cross-validation, 10 or more instructions per fold)"
        )
    if df["generator_1"].iloc[0] == df["generator_2"].iloc[0]:
        return "the model and the reference are the same generator, so LC is 50 by construction"
    if bool((valid == 1.5).all()):
        return "every judgement is a tie (preference 1.5), so there is nothing for the GLM to fit"
    delta = df["output_1"].astype(str).str.len() - df["output_2"].astype(str).str.len()
    spread = float(delta.std())
    if not math.isfinite(spread) or spread == 0:
        return (
            "the length difference between model and reference is the same on every instruction (e.g. "
            "identical or empty answers), so the GLM's standardised length term is undefined"
        )
    return None


def score(
    annotations: Sequence[dict[str, Any]],
    lc_assets_dir: str | Path | None = None,
    subset: bool = False,
    alpaca_eval_order: bool = True,
    use_hub: bool = True,
    source: str = "annotations",
) -> WinRates:
    """WR, LC WR and counts for one model against one reference, with the LC method named in ``lc_method``.

    WR is ``alpaca_eval.metrics.get_winrate`` (reproduces the leaderboard exactly). LC is its
    ``get_length_controlled_winrate``: the ``length_controlled_v1`` GLM needs ``df_gamed.csv`` (two length-gamed
    baselines it regularises towards) and ``instruction_difficulty.csv``, which alpaca_eval fetches from the Hub at
    call time; offline they come from a local directory (``steps.evaluate.lc_glm``). Without them the same GLM is
    fitted without the gamed-baseline regularisation and without instruction difficulty.

    ``length_controlled_winrate`` is None, with a one-sentence ``lc_unavailable_reason``, when the fit cannot mean
    anything: see ``lc_unavailable_reason``, plus a fit that fails or shrinks to the constant (every prediction
    0.5, LC exactly 50 whatever the judgements). ``lc_standard_error`` is alpaca_eval's (the spread of the GLM's
    per-instruction predictions); without instruction difficulty those are all equal, so it is None, not 0.

    ``alpaca_eval_order``: row i is AlpacaEval instruction i, so the per-instruction difficulty and the
    gamed baselines apply; when False (another instruction set) LC uses neither. ``lc_assets_dir`` holds
    ``df_gamed.csv`` (and ``instruction_difficulty.csv``); when None, alpaca_eval's Hub download is tried
    (``use_hub``), and failing that LC is computed without the assets. ``subset``: the rows are a prefix of
    the eval set, which the label records.
    """
    from alpaca_eval.metrics import get_winrate

    df = annotations_frame(annotations, source)
    winrate = {k: _plain(v) for k, v in get_winrate(df).items()}
    assets = _lc_assets(lc_assets_dir, alpaca_eval_order, use_hub)
    lc, lc_se, reason = None, None, lc_unavailable_reason(df)
    if reason is None:
        lc, lc_se, reason = _length_controlled(df, assets)
    scores = WinRates(
        win_rate=winrate["win_rate"],
        standard_error=winrate["standard_error"],
        n_wins=winrate["n_wins"],
        n_wins_base=winrate["n_wins_base"],
        n_draws=winrate["n_draws"],
        n_total=winrate["n_total"],
        discrete_win_rate=winrate["discrete_win_rate"],
        avg_length=int(df["output_2"].astype(str).str.len().mean()),  # as alpaca_eval's leaderboard
        lc_method=lc_method_label(
            subset=subset,
            gamed_regularisation=assets.full_glm,
            instruction_difficulty=assets.full_glm,
            assets=assets.name,
            approximate=assets.approximate,
        ),
        lc_assets=assets.name,
        lc_approximate_assets=assets.approximate,
        length_controlled_winrate=_plain(lc),
        lc_standard_error=_plain(lc_se),
        lc_unavailable_reason=reason,
    )
    logger.info(
        "scored %d annotations: WR %s, LC %s (%s)",
        len(df),
        scores.win_rate,
        scores.length_controlled_winrate,
        reason or scores.lc_method,
    )
    return scores


@dataclass(frozen=True)
class _LcAssets:
    """Which LC computation applies: the full GLM (gamed baselines and instruction difficulty, from ``name``: a
    directory, or "hub") or the GLM without them (``full_glm`` False); ``resolver`` finds a local directory's files."""

    full_glm: bool = False
    name: str | None = None
    approximate: bool = False
    resolver: Callable[[str], Any] | None = None


def _lc_assets(lc_assets_dir: str | Path | None, alpaca_eval_order: bool, use_hub: bool) -> _LcAssets:
    if not alpaca_eval_order:
        if lc_assets_dir is not None:
            logger.warning(
                "ignoring LC assets %s: the rows are not AlpacaEval's instructions in order, so the "
                "per-instruction difficulty and gamed baselines do not apply",
                lc_assets_dir,
            )
        return _LcAssets()
    if lc_assets_dir is not None:
        directory = Path(lc_assets_dir)
        if not (directory / GAMED_FILE).is_file():
            raise LcAssetsError(
                f"LC assets directory {directory} has no {GAMED_FILE}; give a directory "
                f"with {GAMED_FILE} and {DIFFICULTY_FILE}, or none to score without them"
            )
        return _LcAssets(True, str(directory), is_approximate_assets(directory), local_resolver(directory))
    if use_hub and hub_assets_available():
        return _LcAssets(True, "hub")
    return _LcAssets()


def _length_controlled(df: Any, assets: _LcAssets) -> tuple[float | None, float | None, str | None]:
    """(LC, s.e., None) from the GLM the assets allow, or (None, None, reason)."""
    from alpaca_eval.metrics.glm_winrate import GLM_INFO

    if assets.full_glm:
        return _fit(df, GLM_INFO[LC_GLM_NAME], assets.resolver)
    glm_info = {
        "formula": NO_DIFFICULTY_FORMULA,
        "regularize_to_baseline_lambda": None,
        "kwargs": dict(GLM_INFO[LC_GLM_NAME]["kwargs"]),
    }
    lc, _, reason = _fit(df, glm_info, no_assets_resolver(len(df)))
    return lc, None, reason  # one prediction for every instruction: alpaca_eval's s.e. is 0 by construction


def _fit(
    df: Any, glm_info: dict[str, Any], resolver: Callable[[str], Any] | None
) -> tuple[float | None, float | None, str | None]:
    """(LC, s.e., None) from alpaca_eval's GLM, or (None, None, reason) when the fit fails or says nothing."""
    try:
        lc, lc_se, predictions = fit_length_controlled(df, LC_GLM_NAME, glm_info, resolver)
    except LcAssetsError:
        raise
    except (ValueError, ArithmeticError, IndexError, KeyError) as exc:  # sklearn/patsy on degenerate features
        logger.warning("length-controlled GLM failed: %s: %s", type(exc).__name__, exc)
        return None, None, f"alpaca_eval's GLM fit failed ({type(exc).__name__}: {str(exc)[:160]})"
    if not math.isfinite(lc):
        return None, None, "alpaca_eval's GLM gave a non-finite win rate"
    if all(abs(p - 0.5) <= COLLAPSED_FIT_TOLERANCE for p in predictions):
        return (
            None,
            None,
            (
                "the regularised GLM shrank every coefficient to zero (LC would read exactly 50.00 "
                "whatever the judgements); it needs more instructions or a clearer signal"
            ),
        )
    return lc, lc_se, None


def _plain(value: Any) -> Any:
    """numpy scalars to Python numbers (NaN to None) so the result serialises to JSON."""
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
