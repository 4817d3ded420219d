"""fastfair.distributed and the distillation driver over a real process group.

The multi-process tests launch this very file under ``torchrun`` (2 gloo ranks
on the CPU, OMP_NUM_THREADS=1), once per scenario: ``segments`` (exact global
segment statistics and their gradients, the collectives, ``run_on_main``),
``driver`` (DM and DC runs with and without DSA, ``fastfair distill --resume``)
and ``cli`` / ``cli_fail`` (``fastfair distill`` owning the process group,
evaluating during the run, destroying the group on success and on failure).
The ranks write their results to a temporary folder and pytest compares them
with independent single-process references over the union of the shards. A
hung rank fails the test after a timeout instead of hanging CI (torchrun and
its workers are killed).
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastfair
from fastfair import distributed as fd

NPROC = 2
LAUNCH_TIMEOUT_S = 120
# run_on_main check: rank 0's solo work outlasts the timeout of the collective after it.
SHORT_TIMEOUT_S = 3
SOLO_S = 5
_REPO_ROOT = str(Path(fastfair.__file__).resolve().parent.parent)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    # torchrun starts each worker in a session of its own, so killing
    # torchrun's process group would orphan them (and they would keep the
    # output pipe open): collect the workers first, then kill each by pid.
    workers = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _launch(nproc: int, args: list[str], timeout: float = LAUNCH_TIMEOUT_S) -> str:
    """Run this file under torchrun with ``nproc`` ranks; returns its output."""
    env = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    # --standalone: a c10d rendezvous on localhost with a free port chosen by torchrun.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), os.path.abspath(__file__), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun {args} did not finish in {timeout} s:\n{out[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {args} failed (exit {proc.returncode}):\n{out[-6000:]}")
    return out


# ---------------------------------------------------------------------------
# Segment-statistics scenario: data every rank (and the test) builds the same way.


def _segment_cases() -> list[dict]:
    """Global batches; ``perm`` is the batch order that :func:`shard` splits."""
    g = torch.Generator().manual_seed(1234)
    cases = []
    # 1) segment 5 only in rank 0's shard, segment 6 empty everywhere, int64 ids.
    n, d, s = 37, 5, 7
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    ids = torch.randint(0, 5, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    ids[perm[:3]] = 5  # the first rows of the batch: rank 0's shard
    cases.append(dict(x=x, ids=ids, num_segments=s, perm=perm))
    # 2) int32 ids, one segment only in the LAST rank's shard, rows out of order.
    n, d, s = 23, 3, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 3, (n,), generator=g, dtype=torch.int32)
    perm = torch.randperm(n, generator=g)
    ids[perm[-2:]] = 3
    cases.append(dict(x=x, ids=ids, num_segments=s, perm=perm))
    # 3) a single row: the other rank holds nothing at all.
    x = torch.randn(1, 4, generator=g, dtype=torch.float64)
    cases.append(dict(x=x, ids=torch.tensor([2]), num_segments=3, perm=torch.tensor([0])))
    return cases


def _loss_weights(num_segments: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99 + num_segments)
    return (torch.randn(num_segments, d, generator=g, dtype=torch.float64),
            torch.randn(num_segments, d, generator=g, dtype=torch.float64))


def _mean_loss(mean: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Non-linear in the mean, so the gradient depends on the global statistics.
    return (w * (mean - t) ** 2).sum()


def _worker_segments(out_dir: Path) -> None:
    r, w = fd.rank(), fd.world_size()
    result: dict = {"rank": r, "world_size": w, "is_main": fd.is_main(), "local_rank": fd.local_rank()}
    cases = []
    for case in _segment_cases():
        mine = fd.shard(case["perm"])
        x = case["x"][mine].clone().requires_grad_(True)
        ids, s = case["ids"][mine], case["num_segments"]
        mean = fd.segment_mean(x, ids, s)
        wt, tt = _loss_weights(s, x.shape[1])
        (grad_mean,) = torch.autograd.grad(_mean_loss(mean, wt, tt), x)
        total = fd.segment_sum(x, ids, s)
        (grad_sum,) = torch.autograd.grad((wt * total).sum(), x)
        sum2, count2 = fd.segment_sum_count(x.detach(), ids, s)
        cases.append(dict(
            mine=mine, mean=mean.detach(), sum=total.detach(), count=fd.segment_count(ids, s),
            grad_mean=grad_mean, grad_sum=grad_sum, sum2=sum2, count2=count2,
        ))
    result["cases"] = cases
    # The plain collectives the driver uses.
    result["reduced_int"] = fd.all_reduce_sum_(torch.tensor([r + 1, 10 * (r + 1)], dtype=torch.int64))
    result["reduced_float"] = fd.all_reduce_sum_(torch.full((3,), 0.5 + r, dtype=torch.float64))
    result["broadcast"] = fd.broadcast_(torch.full((2,), float(r + 7)), src=w - 1)
    strided = torch.zeros(3, 2, dtype=torch.float64)
    strided[:, 0] = r + 1.0
    col = strided[:, 0]  # a non-contiguous view: reduced in place through a copy
    result["reduced_view"] = (fd.all_reduce_sum_(col) is col, strided.clone())
    fd.barrier()
    # run_on_main: rank 0 works alone for longer than a collective's timeout
    # (SHORT_TIMEOUT_S on this group) while the others wait, then everyone
    # meets in a collective of that group, which would time out on rank 1 if
    # it had not waited.
    short = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S))
    fd.barrier(short)
    t0 = time.monotonic()
    got = fd.run_on_main(lambda: (time.sleep(SOLO_S), "done")[1])
    waited = time.monotonic() - t0
    reduced = fd.all_reduce_sum_(torch.ones(1), group=short)
    result["solo"] = dict(got=got, waited=waited, reduced=reduced)
    torch.save(result, out_dir / f"segments_rank{r}.pt")


# ---------------------------------------------------------------------------
# Driver scenario: DM distillation under torchrun.


# Tiny `synthetic` data: 3 classes x 3 groups at bias 0.9, so a class batch of
# 11 holds 1 or 2 minority images that often sit on one rank only.
DATA_OPTIONS = {"num_classes": 3, "num_groups": 3, "image_size": 8, "n_per_class": 30}
RUN = dict(ipc=2, batch_real=11, dsa=False, width=16, depth=2, log_every=1, checkpoint_every=2, seed=3)


# CAFE on the depth-2 net aligns 3 maps (2 blocks, the embedding); the
# discrimination loss (a sum over real rows, each rank holding its share)
# is on for fairdd, off for COBRA's mode.
CAFE = {"cafe_weights": [1.0, 1.0, 2.0]}


def _tiny_data():  # noqa: ANN202
    from fastfair import data

    return data.load("synthetic", bias_ratio=0.9, **DATA_OPTIONS)


def _run(method: str = "dm", **kw) -> torch.Tensor:
    from fastfair import distill

    settings = dict(RUN, dataset="synthetic", method=method, objective="fairdd", iterations=3)
    if method != "dm":
        settings.update(iterations=2, outer_loop=2, inner_loop=1)
    settings.update(kw)
    res = distill.run(distill.DistillConfig(**settings), _tiny_data(), device="cpu", progress=False)
    return res.images


def _cli_argv(out: Path, iterations: int) -> list[str]:
    argv = ["distill", "--dataset", "synthetic", "--method", "dm", "--objective", "fairdd", "--no-dsa",
            "--ipc", str(RUN["ipc"]), "--batch-real", str(RUN["batch_real"]), "--width", str(RUN["width"]),
            "--depth", str(RUN["depth"]), "--seed", str(RUN["seed"]), "--log-every", "1",
            "--checkpoint-every", "2", "--iterations", str(iterations), "--out", str(out),
            "--device", "cpu", "--no-progress"]
    return argv + [f"--data-option={k}={v}" for k, v in DATA_OPTIONS.items()]


def _cli_distill(out: Path, iterations: int, resume: bool = False) -> torch.Tensor:
    from fastfair import cli

    argv = _cli_argv(out, iterations)
    if resume:
        argv.append("--resume")
    if cli.main(argv) != 0:
        raise RuntimeError(f"fastfair {' '.join(argv)} failed")
    fd.barrier()  # rank 0 writes synset.pt
    return torch.load(out / "synset.pt", weights_only=True)["images"]


def _worker_driver(out_dir: Path) -> None:
    r = fd.rank()
    result = {"dm": _run("dm"), "dm_dsa": _run("dm", dsa=True), "dc": _run("dc"), "dc_dsa": _run("dc", dsa=True),
              "cafe": _run("cafe", **CAFE), "cafe_cobra": _run("cafe", objective="cobra", **CAFE)}
    # `fastfair distill` (the CLI, in this torchrun process group): 4 iterations
    # straight vs 2 iterations, then --resume to 4.
    result["straight"] = _cli_distill(out_dir / "straight", 4)
    _cli_distill(out_dir / "resumed", 2)
    result["first_half_files"] = sorted(os.listdir(out_dir / "resumed"))
    fd.barrier()  # everyone has listed the folder before it changes
    result["resumed"] = _cli_distill(out_dir / "resumed", 4, resume=True)
    torch.save(result, out_dir / f"driver_rank{r}.pt")


# CLI scenarios: `fastfair distill` owns the process group (the worker sets up
# none), evaluates during the run, and destroys the group however it ends. One
# CLI run per launch: a process that destroys its default group cannot
# reliably create another one on torchrun's store (stale rendezvous keys).
CLI_EVAL = ["--eval-every", "1", "--eval-epochs", "1", "--eval-runs", "1", "--eval-model", "ConvNet"]


def _worker_cli(out_dir: Path, fail: bool) -> None:
    from fastfair import cli

    result = {"before": fd.is_initialized()}
    if fail:  # a run that fails after the group is up: ipc larger than a class
        argv = _cli_argv(out_dir / "bad", 2)
        argv[argv.index("--ipc") + 1] = "1000"
    else:  # a good run, evaluating every iteration
        argv = _cli_argv(out_dir / "cli", 2) + CLI_EVAL
    result["rc"] = cli.main(argv)
    result["after"] = fd.is_initialized()
    torch.save(result, out_dir / f"cli_rank{os.environ['RANK']}.pt")


def _worker_main(argv: list[str]) -> None:
    scenario, out_dir = argv[0], Path(argv[1])
    if scenario in ("cli", "cli_fail"):
        _worker_cli(out_dir, fail=scenario == "cli_fail")
        return
    if not fd.init_from_env(backend="gloo", device="cpu"):
        raise SystemExit("worker: expected a multi-process group from torchrun")
    try:
        {"segments": _worker_segments, "driver": _worker_driver}[scenario](out_dir)
    finally:
        fd.cleanup()


# ---------------------------------------------------------------------------
# Independent single-process references (masks and loops, no fastfair ops).


def _reference_stats(x: torch.Tensor, ids: torch.Tensor, s: int):
    sums = torch.zeros(s, x.shape[1], dtype=x.dtype)
    counts = torch.zeros(s, dtype=torch.int64)
    means = torch.zeros(s, x.shape[1], dtype=x.dtype)
    for seg in range(s):
        rows = x[ids.long() == seg]
        counts[seg] = rows.shape[0]
        if rows.shape[0]:
            sums[seg] = rows.sum(0)
            means[seg] = rows.mean(0)
    return sums, counts, means


def _reference_mean_grad(x: torch.Tensor, ids: torch.Tensor, s: int) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    rows = [x[ids.long() == seg] for seg in range(s)]
    mean = torch.stack([r.mean(0) if r.shape[0] else x.new_zeros(x.shape[1]) for r in rows])
    wt, tt = _loss_weights(s, x.shape[1])
    (grad,) = torch.autograd.grad(_mean_loss(mean, wt, tt), x)
    return grad


@pytest.fixture(scope="module")
def segment_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed_segments")
    _launch(NPROC, ["segments", str(out_dir)])
    return [torch.load(out_dir / f"segments_rank{r}.pt") for r in range(NPROC)]


def test_distributed_segment_stats_match_single_process(segment_results: list[dict]) -> None:
    cases = _segment_cases()
    for ci, case in enumerate(cases):
        ref_sum, ref_count, ref_mean = _reference_stats(case["x"], case["ids"], case["num_segments"])
        seen = torch.cat([res["cases"][ci]["mine"] for res in segment_results])
        # The shards are disjoint and their union (in rank order) is the whole batch.
        assert torch.equal(seen, case["perm"])
        for res in segment_results:
            got = res["cases"][ci]
            assert torch.equal(got["count"], ref_count) and torch.equal(got["count2"], ref_count)
            assert got["count"].dtype == torch.int64
            torch.testing.assert_close(got["sum"], ref_sum, rtol=0, atol=1e-12)
            torch.testing.assert_close(got["sum2"], ref_sum, rtol=0, atol=1e-12)
            torch.testing.assert_close(got["mean"], ref_mean, rtol=0, atol=1e-12)
            assert not torch.isnan(got["mean"]).any()
        # Every rank holds bit-identical global statistics.
        a, b = segment_results[0]["cases"][ci], segment_results[1]["cases"][ci]
        assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["sum"], b["sum"])
    # The scenarios cover what they claim: empty on one rank, and on all.
    c0 = segment_results[0]["cases"][0]
    ids0 = cases[0]["ids"]
    assert int(c0["count"][6]) == 0
    assert bool((ids0[segment_results[1]["cases"][0]["mine"]] != 5).all()) and int(c0["count"][5]) == 3
    assert segment_results[1]["cases"][2]["mine"].numel() == 0


def test_distributed_segment_gradients_match_single_process(segment_results: list[dict]) -> None:
    for ci, case in enumerate(_segment_cases()):
        ref_grad = _reference_mean_grad(case["x"], case["ids"], case["num_segments"])
        wt, _ = _loss_weights(case["num_segments"], case["x"].shape[1])
        for res in segment_results:
            got = res["cases"][ci]
            # d loss(global mean) / d (this rank's rows) == the rows of the
            # single-process gradient: no world_size factor, no local counts.
            torch.testing.assert_close(got["grad_mean"], ref_grad[got["mine"]], rtol=0, atol=1e-12)
            torch.testing.assert_close(got["grad_sum"], wt[case["ids"][got["mine"]].long()], rtol=0, atol=0)


def test_distributed_collectives_and_ranks(segment_results: list[dict]) -> None:
    assert [res["rank"] for res in segment_results] == list(range(NPROC))
    for res in segment_results:
        assert res["world_size"] == NPROC and res["is_main"] == (res["rank"] == 0)
        assert res["local_rank"] == res["rank"]  # one node
        assert torch.equal(res["reduced_int"], torch.tensor([3, 30]))
        assert res["reduced_int"].dtype == torch.int64
        torch.testing.assert_close(res["reduced_float"], torch.full((3,), 2.0, dtype=torch.float64))
        torch.testing.assert_close(res["broadcast"], torch.full((2,), float(NPROC - 1 + 7)))
        same, strided = res["reduced_view"]
        assert same and torch.equal(strided[:, 0], torch.full((3,), 3.0, dtype=torch.float64))
        assert torch.equal(strided[:, 1], torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------------------
# The distillation driver under torchrun.

# float32: the 2-rank run sums each segment in two partial sums plus one
# all-reduce, one process in a single pass, so the synthetic sets agree to
# rounding (observed max |diff| 2.4e-7 for DM and DC, 3e-7 after 4 DM
# iterations), not bitwise.
DM_ATOL = 2e-6


@pytest.fixture(scope="module")
def driver_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    # Only while the driver is not in the checkout; once it is, every failure shows.
    if importlib.util.find_spec("fastfair.distill") is None or importlib.util.find_spec("fastfair.cli") is None:
        pytest.skip("the distillation driver (fastfair.distill, fastfair.cli) is not in this checkout")
    out_dir = tmp_path_factory.mktemp("distributed_driver")
    _launch(NPROC, ["driver", str(out_dir)])
    return [torch.load(out_dir / f"driver_rank{r}.pt") for r in range(NPROC)], out_dir


def test_distributed_dm_matches_one_process(driver_results: tuple[list[dict], Path]) -> None:
    results, _ = driver_results
    for key in ("dm", "dm_dsa", "dc", "dc_dsa", "straight", "resumed"):
        # The synthetic set is replicated: every rank ends with the same one, bitwise.
        assert torch.equal(results[0][key], results[1][key]), key
    one = _run("dm")  # one process, same seed: the same global real batch every iteration
    torch.testing.assert_close(results[0]["dm"], one, rtol=0, atol=DM_ATOL)
    # Not vacuous: the iterations move the images far more than the tolerance.
    assert (one - _run("dm", iterations=1)).abs().max() > 1000 * DM_ATOL


def test_distributed_dc_matches_one_process(driver_results: tuple[list[dict], Path]) -> None:
    results, _ = driver_results
    one = _run("dc")
    torch.testing.assert_close(results[0]["dc"], one, rtol=0, atol=DM_ATOL)
    assert (one - _run("dc", iterations=1)).abs().max() > 100 * DM_ATOL


def test_distributed_cafe_matches_one_process(driver_results: tuple[list[dict], Path]) -> None:
    results, _ = driver_results
    for key, kw in (("cafe", {}), ("cafe_cobra", {"objective": "cobra"})):
        assert torch.equal(results[0][key], results[1][key]), key
        one = _run("cafe", **CAFE, **kw)
        torch.testing.assert_close(results[0][key], one, rtol=0, atol=DM_ATOL)
        assert (one - _run("cafe", **CAFE, **kw, iterations=1)).abs().max() > 100 * DM_ATOL, key


def test_distributed_dm_with_dsa_matches_one_process(driver_results: tuple[list[dict], Path]) -> None:
    # Each rank augments its real rows with the DSA parameters of their places
    # in the global class batch (Batch.offsets), so DSA does not break the
    # equality with one process.
    results, _ = driver_results
    one = _run("dm", dsa=True)
    torch.testing.assert_close(results[0]["dm_dsa"], one, rtol=0, atol=DM_ATOL)
    # DSA did change the run (the comparison is not the no-DSA one again).
    assert (one - _run("dm")).abs().max() > 1000 * DM_ATOL


def test_distributed_dc_with_dsa_matches_one_process(driver_results: tuple[list[dict], Path]) -> None:
    results, _ = driver_results
    assert torch.equal(results[0]["dc_dsa"], results[1]["dc_dsa"])
    torch.testing.assert_close(results[0]["dc_dsa"], _run("dc", dsa=True), rtol=0, atol=DM_ATOL)


def test_distributed_cli_resume(driver_results: tuple[list[dict], Path]) -> None:
    results, out_dir = driver_results
    assert {"checkpoint.pt", "synset.pt", "log.jsonl"} <= set(results[0]["first_half_files"])
    for res in results:
        # 2 iterations, then --resume to 4 == 4 uninterrupted, bitwise (CPU).
        assert torch.equal(res["resumed"], res["straight"])
    ck = torch.load(out_dir / "resumed" / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 4 and ck["world_size"] == NPROC
    lines = (out_dir / "resumed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]  # rank 0 logs, once
    # The CLI run is the same run as the API's 4-iteration run on one process.
    torch.testing.assert_close(results[0]["straight"], _run("dm", iterations=4), rtol=0, atol=DM_ATOL)


def test_distributed_run_on_main_outlasts_a_collective_timeout(segment_results: list[dict]) -> None:
    r0, r1 = (res["solo"] for res in segment_results)
    assert r0["got"] == "done" and r1["got"] is None  # rank 0 alone ran it
    assert r1["waited"] >= SOLO_S - 0.5 > SHORT_TIMEOUT_S  # rank 1 waited past the short timeout...
    for res in (r0, r1):
        assert torch.equal(res["reduced"], torch.full((1,), float(NPROC)))  # ...and the collective after it worked


def _launch_cli(tmp_path_factory: pytest.TempPathFactory, scenario: str) -> tuple[list[dict], Path]:
    if importlib.util.find_spec("fastfair.cli") is None:
        pytest.skip("the CLI (fastfair.cli) is not in this checkout")
    out_dir = tmp_path_factory.mktemp(f"distributed_{scenario}")
    _launch(NPROC, [scenario, str(out_dir)])
    return [torch.load(out_dir / f"cli_rank{r}.pt") for r in range(NPROC)], out_dir


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    return _launch_cli(tmp_path_factory, "cli")


def test_distributed_cli_owns_and_destroys_the_group(cli_results: tuple[list[dict], Path],
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    for res in cli_results[0]:
        assert res["before"] is False and res["rc"] == 0 and res["after"] is False
    failed, _ = _launch_cli(tmp_path_factory, "cli_fail")
    for res in failed:
        assert res["before"] is False
        assert res["rc"] == 2 and res["after"] is False  # destroyed although the run failed


def test_distributed_cli_evaluates_on_rank_0_during_the_run(cli_results: tuple[list[dict], Path]) -> None:
    _, out_dir = cli_results
    entries = [json.loads(line) for line in (out_dir / "cli" / "log.jsonl").read_text().splitlines()]
    evals = [e["iteration"] for e in entries if "eval" in e]
    assert evals == [1, 2]  # once per iteration, logged by rank 0 only
    assert all(0 <= e["eval"]["acc"] <= 100 for e in entries if "eval" in e)
    images = torch.load(out_dir / "cli" / "synset.pt", weights_only=True)["images"]
    # Evaluating (on rank 0 only) does not disturb the run.
    torch.testing.assert_close(images, _run("dm", iterations=2), rtol=0, atol=DM_ATOL)


# ---------------------------------------------------------------------------
# Single process: everything is a no-op; shard() covers the batch.


def test_distributed_helpers_are_noops_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert fd.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fd.init_from_env() is False
    assert not fd.is_initialized()
    assert (fd.rank(), fd.world_size(), fd.is_main()) == (0, 1, True)
    t = torch.arange(4.0)
    assert fd.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(4.0))
    assert fd.broadcast_(t) is t
    fd.barrier()
    fd.cleanup()
    assert fd.run_on_main(lambda: 42) == 42
    with fd.process_group() as active:
        assert active is False and not fd.is_initialized()
    x = torch.randn(9, 3, dtype=torch.float64)
    ids = torch.tensor([0, 2, 2, 1, 0, 2, 2, 0, 1])
    ref_sum, ref_count, ref_mean = _reference_stats(x, ids, 4)
    torch.testing.assert_close(fd.segment_sum(x, ids, 4), ref_sum, rtol=0, atol=1e-12)
    torch.testing.assert_close(fd.segment_mean(x, ids, 4), ref_mean, rtol=0, atol=1e-12)
    assert torch.equal(fd.segment_count(ids, 4), ref_count)


def test_distributed_init_from_env_refuses_incomplete_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        fd.init_from_env(backend="gloo", device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        fd.init_from_env()
    assert not fd.is_initialized()


@pytest.mark.parametrize("n", [0, 1, 5, 8, 257])
@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_distributed_shard_covers_the_batch(n: int, w: int) -> None:
    idx = torch.randperm(n) + 100
    parts = [fd.shard(idx, r, w) for r in range(w)]
    assert torch.equal(torch.cat(parts), idx)  # disjoint, complete, in order
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert torch.equal(fd.shard(idx, 1, w) if w > 1 else fd.shard(idx), parts[1 if w > 1 else 0])


@pytest.mark.parametrize("w", [1, 2, 3, 4])
@pytest.mark.parametrize("per_group", [False, True])
def test_distributed_sampler_offsets_place_each_shard_in_the_global_batch(w: int, per_group: bool) -> None:
    from fastfair.distill.sampler import RealSampler

    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (60,), generator=g)
    labels[:2] = 2  # class 2 has at least 2 images; class sizes vary
    groups = torch.randint(0, 2, (60,), generator=g)
    one = RealSampler(labels, groups, 3, 2, batch_real=7, sample_per_group=per_group)
    full = one.draw(torch.Generator().manual_seed(11))
    assert full.row_offsets() == [0, 0, 0]
    full_parts = torch.split(full.indices, full.sizes)
    for r in range(w):
        s = RealSampler(labels, groups, 3, 2, batch_real=7, sample_per_group=per_group, rank=r, world_size=w)
        b = s.draw(torch.Generator().manual_seed(11))
        assert b.offsets == s.local_offsets() and b.sizes == s.local_sizes()
        for c, part in enumerate(torch.split(b.indices, b.sizes)):
            # rank r's rows of class c ARE rows [offset, offset + size) of the one-process class batch
            o = b.offsets[c]
            assert torch.equal(part, full_parts[c][o:o + b.sizes[c]])
    # The ranks tile each class batch: the last rank's rows end at the global size.
    last = RealSampler(labels, groups, 3, 2, batch_real=7, sample_per_group=per_group, rank=w - 1, world_size=w)
    assert [o + n for o, n in zip(last.local_offsets(), last.local_sizes())] == one.global_sizes()


def test_distributed_shard_rejects_bad_ranks() -> None:
    with pytest.raises(ValueError):
        fd.shard(torch.arange(4), 2, 2)
    with pytest.raises(ValueError):
        fd.shard(torch.arange(4).view(2, 2), 0, 2)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
