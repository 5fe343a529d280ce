"""Judge agreement: measured against official annotations, recorded in a dated registry keyed by judge identity,
annotations file and limit, and found again by ``recorded_agreement`` (what results get labelled with)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys

import pytest

from steps.evaluate.agreement import (
    AgreementRegistryError,
    judge_agreement,
    record_agreement,
    recorded_agreement,
    registry_key,
)
from steps.evaluate.annotate import annotate
from steps.evaluate.judges import make_judge


def _official(shared_dir, model="vicuna-7b-v1.5"):
    path = shared_dir / "alpaca_eval" / "annotations" / f"{model}.json"
    with open(path, encoding="utf-8") as fh:
        return path, json.load(fh)


def _tiny_judge(tokenizer, model):
    return make_judge("local_logprob:tiny", tokenizer=tokenizer, model=model, device="cpu", show_progress=False)


def _plain_agreement(official_rows, judged_rows):
    pairs = [(o["preference"] - 1.5, j["preference"] - 1.5) for o, j in zip(official_rows, judged_rows)]
    pairs = [(a, b) for a, b in pairs if a != 0 and b != 0]
    agree = sum((a > 0) == (b > 0) for a, b in pairs)
    p_a = sum(a > 0 for a, _ in pairs) / len(pairs)
    p_b = sum(b > 0 for _, b in pairs) / len(pairs)
    expected = p_a * p_b + (1 - p_a) * (1 - p_b)
    return agree, len(pairs), max(p_a, 1 - p_a), (agree / len(pairs) - expected) / (1 - expected)


def test_agreement_and_registry_round_trip(shared_dir, tokenizer, tiny_model_factory, tmp_path):
    path, official = _official(shared_dir)
    judge = _tiny_judge(tokenizer, tiny_model_factory(seed=2))
    result = judge_agreement(official, judge, limit=6)
    mine = annotate(
        [{"instruction": r["instruction"], "output": r["output_2"]} for r in official[:6]],
        [{"instruction": r["instruction"], "output": r["output_1"]} for r in official[:6]],
        _tiny_judge(tokenizer, tiny_model_factory(seed=2)),
    )
    agree, compared, baseline, kappa = _plain_agreement(official[:6], mine)
    assert (result["n_agree"], result["n_compared"]) == (agree, compared)
    assert result["agreement"] == agree / compared
    assert result["majority_baseline_agreement"] == pytest.approx(baseline)
    assert result["cohens_kappa"] == pytest.approx(kappa)

    registry = tmp_path / "registry.json"
    assert recorded_agreement(judge, registry) is None
    entry = record_agreement(result, judge, path, 6, path=registry)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    data = json.loads(registry.read_text())
    assert list(data["entries"]) == [f"{judge.cache_identity}|annotations_sha256={sha[:16]}|limit=6"]
    assert list(data["entries"]) == [registry_key(judge, sha, 6)]
    assert entry["annotations_sha256"] == sha and entry["agreement"] == result["agreement"]
    measured = dt.datetime.fromisoformat(entry["measured_at"])
    assert abs((dt.datetime.now(dt.timezone.utc) - measured).total_seconds()) < 120
    found = recorded_agreement(judge, registry)
    assert found["agreement"] == result["agreement"] and found["n_measurements"] == 1
    assert recorded_agreement(judge.cache_identity, registry)["agreement"] == result["agreement"]

    # the same key is replaced, another limit is another entry; the latest is what results get
    record_agreement(result, judge, path, 6, path=registry)
    assert len(json.loads(registry.read_text())["entries"]) == 1
    later = dict(result, agreement=0.25)
    record_agreement(later, judge, path, 4, path=registry)
    found = recorded_agreement(judge, registry)
    assert found["n_measurements"] == 2 and found["limit"] == 4 and found["agreement"] == 0.25
    other = make_judge("local_logprob:tiny", judge_max_chars=99, device="cpu")
    assert recorded_agreement(other, registry) is None  # another identity: another judge


def test_corrupt_registry(tmp_path, caplog, tokenizer):
    registry = tmp_path / "registry.json"
    registry.write_text("{not json")
    judge = make_judge("local_logprob:tiny", device="cpu")
    assert recorded_agreement(judge, registry) is None
    assert "judge agreement not attached" in caplog.text
    with pytest.raises(AgreementRegistryError, match=r"registry\.json: not valid JSON"):
        record_agreement({"agreement": 0.5}, judge, registry, 1, path=registry)


def test_agreement_cli_records_the_measurement(shared_dir, tokenizer, tiny_model_factory, tmp_path):
    path, official = _official(shared_dir, "alpaca-7b")
    registry = tmp_path / "agreement.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "steps.evaluate",
            "agreement",
            "--judge",
            "local_logprob:tiny",
            "--annotations",
            str(path),
            "--limit",
            "4",
            "--registry",
            str(registry),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    mine = annotate(
        [{"instruction": r["instruction"], "output": r["output_2"]} for r in official[:4]],
        [{"instruction": r["instruction"], "output": r["output_1"]} for r in official[:4]],
        _tiny_judge(tokenizer, tiny_model_factory(seed=0)),
    )
    agree, compared, _, _ = _plain_agreement(official[:4], mine)
    assert (result["n_agree"], result["n_compared"], result["limit"]) == (agree, compared, 4)
    assert result["recorded_in"] == str(registry)
    (entry,) = json.loads(registry.read_text())["entries"].values()
    assert entry["n_agree"] == agree and entry["limit"] == 4 and entry["annotations_name"] == "alpaca-7b.json"
    assert entry["judge"] == "local_logprob:tiny" and entry["weak_judge"] is True
