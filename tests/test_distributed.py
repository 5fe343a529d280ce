"""Two gloo processes x grad_accum A take the same optimizer steps as one process x 2A, with DDP and with FSDP2;
the reference precompute is sharded and equal to one process's; checkpoints are per-rank shards that resume
exactly (also in one process); a non-finite loss on one rank stops both with the same error."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from steps.train.objectives import PreferenceObjective
from steps.train.reference import References
from tests.faults import stop_after_checkpoint
from tests.test_train import TOPICS_TRAIN, pair_rows, pairs_from_rows

PER_RANK_ACCUM = 3  # 2 ranks x 3 = 6 micro-batches per step; the 8 of the epoch give steps of 6 and 2 (1 per rank)
WORLD = 2


class CountingObjective(PreferenceObjective):
    """The real DPO objective; counts the forwards this rank trains and can poison one of them (``nan_at``). Before
    each forward it notes what the gradients left by the step's earlier backwards look like (``grads``)."""

    def __init__(self, *args, nan_at: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.nan_at, self.grads = 0, nan_at, []

    def micro_step(self, model, batch, denominator):
        self.calls += 1
        self.grads.append(gradient_state(model))
        loss, metrics = super().micro_step(model, batch, denominator)
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return loss, metrics


def gradient_state(model) -> str:
    """'none' (no gradient yet), 'sharded' (every gradient a DTensor holding just this rank's shard of its
    parameter), or 'whole' (plain tensors of the parameters' full size)."""
    from torch.distributed.tensor import DTensor

    grads = [(p, p.grad) for p in model.parameters() if p.requires_grad]
    if all(g is None for _, g in grads):
        return "none"
    local = [(p.to_local(), g) for p, g in grads if isinstance(p, DTensor) and isinstance(g, DTensor)]
    if len(local) == len(grads) and all(g.to_local().shape == p.shape for p, g in local):
        return "sharded"
    return "whole"


class GroupAllReduces:
    """Counts all-reduces over a sub-group (FSDP2's HSDP all-reduce across replicas; the trainer's own collectives
    use the default group)."""

    def __init__(self):
        import torch.distributed as dist

        self.count, real = 0, dist.all_reduce

        def counting(tensor, *args, group=None, **kwargs):
            self.count += group is not None
            return real(tensor, *args, group=group, **kwargs)

        dist.all_reduce = counting


def _run(
    rank: int,
    world_size: int,
    init_file: str,
    out_dir: str,
    parallelism: str = "ddp",
    stop_after_step: int | None = None,
    grad_accum: int = PER_RANK_ACCUM,
    nan_rank: int | None = None,
    local_world_size: int | None = None,
    cached_on_rank0: bool = False,
) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if local_world_size is not None:  # ranks per node: 1 of 2 makes two "nodes", so FSDP2 builds an HSDP mesh
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    replica_all_reduces = GroupAllReduces()
    torch.set_num_threads(1)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=90),  # a rank left waiting fails the test instead of hanging it
        )
    from steps.config import PreferenceConfig
    from steps.losses import build_loss
    from steps.models import load_model, load_tokenizer
    from steps.train import checkpoints, collectives, parallel
    from steps.train.loop import TrainingDivergedError, train
    from steps.train.objectives import precompute_reference

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer("tiny")
    pairs = pairs_from_rows(tok, pair_rows(TOPICS_TRAIN))
    cfg = PreferenceConfig(
        lr=2e-3,
        max_num_tokens=200,
        epochs=1,
        grad_accum=grad_accum,
        seed=3,
        dev_every_epoch=False,
        parallelism=parallelism,
        checkpoint_every_steps=1,
    )
    model = load_model("tiny", seed=4)
    if cached_on_rank0:  # rank 0 found scores (its node's cache file), rank 1 none: the trainer scores on both
        for i, pair in enumerate(pairs if rank == 0 else []):
            pair.reference_chosen, pair.reference_rejected = -1.0 - i, -2.0 - i
    else:
        precompute_reference(model, pairs, tok.pad_token_id, cfg)
    nan_at = PER_RANK_ACCUM + 1 if nan_rank == rank else None  # this rank's first micro-batch of step 2
    obj = CountingObjective(pairs, [], tok.pad_token_id, cfg, build_loss("dpo", beta=0.1), True, nan_at=nan_at)
    record: dict = {"reference": [[p.reference_chosen, p.reference_rejected] for p in pairs]}
    try:
        with stop_after_checkpoint(stop_after_step) if stop_after_step is not None else contextlib.nullcontext():
            result = train(model, obj, cfg, out_dir, resume=True)
        from torch.distributed.tensor import DTensor

        sharded = [isinstance(p, DTensor) for p in result.model.parameters()]
        record["sharded"] = all(sharded) and bool(sharded)
        record["layout"] = parallel.last_layout()
        checkpoints.export_model(result.model, None, out / "final")
        record["history"] = [
            {k: h[k] for k in ("loss", "reward_accuracy", "tokens", "grad_norm")} for h in result.history
        ]
    except KeyboardInterrupt:  # stop_after_step: a simulated kill after a checkpoint
        pass
    except TrainingDivergedError as exc:
        record["error"] = str(exc)
    finally:
        record["reference_after"] = [[p.reference_chosen, p.reference_rejected] for p in pairs]
        record["micro_steps"] = obj.calls
        record["grads"] = obj.grads
        record["replica_all_reduces"] = replica_all_reduces.count
        record["collectives"] = [[what, dev, n] for (what, dev), n in collectives.CALLS.items()]
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        if world_size > 1:
            torch.distributed.destroy_process_group()


def _spawn(tmp_path: Path, name: str, **kwargs) -> Path:
    out = tmp_path / name
    init = tmp_path / f"init-{name}-{kwargs.get('stop_after_step')}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(r, WORLD, str(init), str(out)), kwargs=kwargs) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


def _record(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory, tokenizer) -> Path:
    """One process, grad_accum = 2 ranks x 3: the global batch the 2-rank runs must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    _run(0, 1, "", str(out), grad_accum=WORLD * PER_RANK_ACCUM)
    return out


def _assert_same_steps(a_dir: Path, b_dir: Path) -> None:
    one, two = (_record(d)["history"] for d in (a_dir, b_dir))
    assert len(one) == len(two) == 2  # 8 micro-batches: a step of 6, then a tail of 2 (one per rank)
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["reward_accuracy"] == pytest.approx(b["reward_accuracy"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = (load_file(d / "final" / "model.safetensors") for d in (a_dir, b_dir))
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == torch.float32, key  # the export keeps the fp32 master weights
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, single, parallelism):
    double = _spawn(tmp_path, parallelism, parallelism=parallelism)
    _assert_same_steps(single, double)
    _assert_same_weights(single, double)
    ranks = [_record(double, r) for r in range(WORLD)]
    # the reference precompute was sharded (each rank scored half the batches) and gathered: after the
    # all-reduce every rank holds exactly the numbers one process computes
    expected = _record(single)["reference"]
    assert all(c is not None for c, _ in expected)
    assert [r["reference"] for r in ranks] == [expected] * WORLD
    assert [r["sharded"] for r in ranks] == [parallelism == "fsdp"] * WORLD
    # per-rank grad_accum and no dummy forwards: rank r ran its 3 of step 1 and 1 of the tail, nothing more
    assert [r["micro_steps"] for r in ranks] == [PER_RANK_ACCUM + 1] * WORLD
    # between the micro-batches of a step: DDP accumulates whole gradients locally (no_sync); FSDP2 reduce-scatters
    # every micro-batch, so a rank only ever holds its shard of the gradients, never an unsharded fp32 copy
    between = "sharded" if parallelism == "fsdp" else "whole"
    assert [r["grads"] for r in ranks] == [["none", between, between, "none"]] * WORLD
    assert _record(single)["micro_steps"] == WORLD * PER_RANK_ACCUM + WORLD
    # every collective the trainer issued went through the placement check on the rank's device (cpu here)
    for r in ranks:
        calls = {(what, dev): n for what, dev, n in r["collectives"]}
        assert {dev for _, dev in calls} == {"cpu"}
        assert calls[("step denominator", "cpu")] == calls[("step metrics", "cpu")] == 2
        assert calls[("reference log-probs", "cpu")] == 1
        assert (("DDP gradient bucket", "cpu") in calls) == (parallelism == "ddp")


def test_hsdp_all_reduces_across_replicas_once_per_step_and_matches_one_process(tmp_path, single):
    """Two ranks as two nodes of one rank (LOCAL_WORLD_SIZE=1): FSDP2 builds the HSDP mesh (2 replicas x 1 shard);
    each micro-batch reduce-scatters, the all-reduce across replicas waits for the step's last micro-batch."""
    double = _spawn(tmp_path, "hsdp", parallelism="fsdp", local_world_size=1)
    _assert_same_steps(single, double)
    _assert_same_weights(single, double)
    for rank in range(WORLD):
        record = _record(double, rank)
        assert record["layout"]["mesh"] == [2, 1] and record["layout"]["mesh_dims"] == ["replicate", "shard"]
        # 2 steps x 3 FSDP2 groups (2 decoder layers + the root): once per step, not once per micro-batch (4 x 3)
        assert record["replica_all_reduces"] == 2 * 3, record["replica_all_reduces"]


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_sharded_checkpoints_resume_exactly_also_in_one_process(tmp_path, single, parallelism):
    out = _spawn(tmp_path, parallelism, parallelism=parallelism, stop_after_step=1)
    ckpt = out / "checkpoints" / "step_0000001"
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_0000001"]
    shards = sorted(p.name for p in (ckpt / "state").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own file
    if parallelism == "fsdp":  # each rank holds half of every tensor: neither file is the whole state
        sizes = [(ckpt / "state" / s).stat().st_size for s in shards]
        assert max(sizes) < 0.6 * sum(sizes), sizes
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert not (ckpt / "model").exists()  # no gathered copy: the HF export is only the final model
    elsewhere = tmp_path / f"{parallelism}-in-one-process"
    shutil.copytree(out, elsewhere)

    out = _spawn(tmp_path, parallelism, parallelism=parallelism)  # picks up the step-1 checkpoint
    _assert_same_steps(single, out)
    _assert_same_weights(single, out)
    # the same 2-rank checkpoint resumed by one process (DCP reshards; grad_accum 6 = the same global batch)
    _run(0, 1, "", str(elsewhere), grad_accum=WORLD * PER_RANK_ACCUM)
    _assert_same_steps(single, elsewhere)
    _assert_same_weights(single, elsewhere)


def test_scores_missing_on_one_rank_only_are_scored_by_every_rank_together(tmp_path, single):
    """A node that does not see rank 0's reference cache: the ranks agree to score (one tiny all-reduce) instead of
    one rank entering the collective scoring pass alone and the job hanging."""
    out = _spawn(tmp_path, "half-cached", parallelism="fsdp", cached_on_rank0=True)
    rank0, rank1 = (_record(out, r) for r in range(WORLD))
    assert rank0["reference_after"] == [[-1.0 - i, -2.0 - i] for i in range(len(rank0["reference_after"]))]
    scored = rank1["reference_after"]
    assert all(c is not None and r is not None and c < 0 and r < 0 for c, r in scored)
    # rank 1's scores are the policy's own, in the training layout: what one process computes ahead, within fp32
    for (c, r), (c1, r1) in zip(scored, _record(single)["reference"]):
        assert c == pytest.approx(c1, abs=1e-4) and r == pytest.approx(r1, abs=1e-4)
    assert [len(_record(out, r)["history"]) for r in range(WORLD)] == [2, 2]


def test_non_finite_loss_on_one_rank_stops_both_with_the_error(tmp_path):
    out = _spawn(tmp_path, "nan", nan_rank=1)
    errors = [_record(out, r).get("error") or "" for r in range(WORLD)]
    for message in errors:
        assert "non-finite loss at optimizer step 2 on rank(s) [1] of 2" in message, errors
        assert "step_0000001" in message  # the last good checkpoint, named on every rank
    assert "micro-batch 0 here" in errors[1] and "micro-batch" not in errors[0]
    assert not (out / "checkpoints" / "step_0000002").exists()


def test_torchrun_launcher_trains_a_sharded_model_like_one_process(tmp_path, tokenizer):
    """The flow's path: steps.train.launch starts torchrun; 2 FSDP2 ranks write the same final model as 1 process."""
    from steps.config import config_from_dict, for_loss
    from steps.io import write_jsonl
    from steps.train.launch import launch

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_jsonl(data_dir / "preference.train.jsonl", pair_rows(TOPICS_TRAIN))

    def raw(grad_accum: int) -> dict:
        return {
            "name": "launch_test",
            "model": {"base": "tiny", "dtype": "float32"},
            "preference": {
                "criterion": "dpo",
                "criterion_config": {"beta": 0.1},
                "lr": 2e-3,
                "max_num_tokens": 200,
                "max_seq_len": 200,
                "grad_accum": grad_accum,
                "seed": 3,
                "dev_every_epoch": False,
                "parallelism": "fsdp",
            },
            "resources": {"process_group_timeout_s": 120},
        }

    os.environ["OMP_NUM_THREADS"] = "1"
    one = launch(
        for_loss(config_from_dict(raw(WORLD * PER_RANK_ACCUM)), "dpo"),
        "dpo",
        str(data_dir),
        str(tmp_path / "one"),
        nproc_per_node=1,
    )
    two = launch(
        for_loss(config_from_dict(raw(PER_RANK_ACCUM)), "dpo"),
        "dpo",
        str(data_dir),
        str(tmp_path / "two"),
        nproc_per_node=WORLD,
    )
    assert one.steps == two.steps == 2
    assert two.final_train["loss"] == pytest.approx(one.final_train["loss"], abs=1e-5)
    a, b = (load_file(Path(s.model_dir) / "model.safetensors") for s in (one, two))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


DEV_TOPICS = TOPICS_TRAIN[:13]


def _dev_metrics_run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Dev metrics (``PreferenceObjective.evaluate``: the shared pair scorer in lockstep, sums all-reduced) of an
    FSDP2-sharded policy against a live sharded reference and against stored reference sums of the same model."""
    torch.set_num_threads(1)
    if world_size > 1:
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=90)
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timeout
        )
    from steps.config import PreferenceConfig
    from steps.losses import build_loss
    from steps.models import load_model, load_tokenizer
    from steps.train import parallel
    from steps.train.objectives import precompute_reference
    from steps.train.precision import resolve_precision

    tok = load_tokenizer("tiny")
    dev = pairs_from_rows(tok, pair_rows(DEV_TOPICS))  # 7 dev batches at 200 tokens: one rank repeats one
    cfg = PreferenceConfig(max_num_tokens=200, parallelism="fsdp")
    precision = resolve_precision("float32", "float32", torch.device("cpu"))
    policy = parallel.prepare(load_model("tiny", seed=4), "fsdp", precision)
    live = parallel.prepare_frozen(load_model("tiny", seed=5), "fsdp", precision)
    loss = build_loss("dpo", beta=0.1)
    record = {"plan": len(PreferenceObjective([], dev, tok.pad_token_id, cfg, loss, True).dev_plan())}
    record["live"] = PreferenceObjective([], dev, tok.pad_token_id, cfg, loss, True, References(live=live)).evaluate(
        policy
    )
    precompute_reference(load_model("tiny", seed=5), dev, tok.pad_token_id, cfg)
    record["stored"] = PreferenceObjective([], dev, tok.pad_token_id, cfg, loss, True).evaluate(policy)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    if world_size > 1:
        torch.distributed.destroy_process_group()


def test_dev_metrics_of_two_sharded_ranks_are_one_process_s_and_the_loss_of_each_pair(tmp_path, tokenizer):
    """Two FSDP2 ranks score their dealt dev batches in lockstep (the odd one repeated and discarded) and sum:
    every rank gets one process's dev metrics, which are DPO's loss averaged over pairs scored one at a time."""
    import math

    from steps.models import load_model
    from steps.train.logprobs import sequence_logprobs

    _dev_metrics_run(0, 1, "", str(tmp_path / "one"))
    one = _record(tmp_path / "one")
    ctx = mp.get_context("spawn")
    init = tmp_path / "init-dev"
    procs = [ctx.Process(target=_dev_metrics_run, args=(r, WORLD, str(init), str(tmp_path / "two"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert one["plan"] % WORLD == 1  # the lockstep repeat is exercised
    for rank in range(WORLD):
        for source in ("live", "stored"):
            two = _record(tmp_path / "two", rank)[source]
            assert two.keys() == one[source].keys() and two == pytest.approx(one[source], abs=1e-5), (rank, source)
    assert one["live"] == pytest.approx(one["stored"], abs=1e-5)
    # independently: each pair in a batch of its own, DPO's loss by its formula
    from steps.train.batching import collate_pairs

    policy, reference = load_model("tiny", seed=4), load_model("tiny", seed=5)
    losses = []
    for pair in pairs_from_rows(tokenizer, pair_rows(DEV_TOPICS)):
        batch = collate_pairs([pair], tokenizer.pad_token_id, share_prompt=False)
        with torch.no_grad():
            (c, r), (rc, rr) = (
                sequence_logprobs(policy, batch)[0].tolist(),
                sequence_logprobs(reference, batch)[0].tolist(),
            )
        losses.append(math.log1p(math.exp(-0.1 * ((c - rc) - (r - rr)))))
    assert one["stored"]["dev_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert one["stored"]["dev_pairs"] == len(losses)
