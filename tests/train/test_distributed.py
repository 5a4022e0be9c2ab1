"""Data-parallel training pieces (train/distributed.py), with real gloo process groups on the CPU.

Collective checks run in 2 spawned processes joined in a gloo group on 127.0.0.1; the key check compares
the averaged LoRA gradient of 2 processes on the tiny DiT with 1 process's gradient of the whole batch.
`launch_command` is the command that really starts N gloo processes on a CPU-only machine with the
accelerate of this environment (verified by `test_launch_command_starts_a_gloo_group`).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from anima_trainer.config import ConfigError
from anima_trainer.train.distributed import (
    Distributed,
    check_state_world,
    check_supported,
    needs_cpu_backend,
    read_rank_rng,
    saved_world_size,
    shard_batches,
    take_owned,
    write_rank_rngs,
)

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 240.0  # only a deadlock guard: start-up on a loaded 2-core machine is slow


# ------------------------------------------------------------------------------------------ helpers --

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=DEADLINE_S))
    try:
        result = fn(Distributed.from_process_group(), Path(out), *args)
        with open(Path(out) / f"result{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def run_processes(fn, tmp_path: Path, *args, world: int = 2) -> list:
    """`fn(dist, tmp_path, *args)` in `world` spawned processes forming a gloo group; their results."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(world, free_port(), fn, str(tmp_path), args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__}: the processes did not finish in {DEADLINE_S:.0f} s")
    results = []
    for rank in range(world):
        with open(tmp_path / f"result{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def run_checks(checks: dict) -> dict:
    """{name: check()} for zero-argument checks run inside one spawned process; an error is kept as its
    traceback so that only the test reading that result fails (starting processes is the slow part)."""
    import traceback

    results = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception:  # noqa: BLE001 - reported by the test that reads this result
            results[name] = {"error": traceback.format_exc()}
    return results


def _run_checks(d: Distributed, out: Path, names: list[str]) -> dict:
    """Every gloo check in one process group (starting processes is the slow part); an error is returned
    as its traceback so that only its own test fails."""
    import traceback

    results = {}
    control = Distributed.from_process_group(control_group=True)  # flags and objects through a 2nd group
    for name in names:
        folder = out / name
        folder.mkdir(exist_ok=True)
        try:
            results[name] = GLOO_CHECKS[name](d if name != "control_group" else control, folder)
        except Exception:  # noqa: BLE001 - reported by the test that reads this result
            results[name] = {"error": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def gloo(tmp_path_factory) -> tuple[Path, list[dict]]:
    """(folder, per-rank results) of every check in GLOO_CHECKS, run in 2 processes of one gloo group."""
    from anima_trainer.demo import write_shapes_dataset, write_tiny_dit

    root = tmp_path_factory.mktemp("gloo")
    write_tiny_dit(root / "tiny_dit.safetensors", seed=3)
    images = write_shapes_dataset(root / "images", count=5, size=32, seed=1)
    (root / "dataset.toml").write_text(
        f'[general]\nresolution = 32\nenable_bucket = false\ncaption_extension = ".txt"\nbatch_size = 2\n\n'
        f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = {json.dumps(str(images))}\n', encoding="utf-8")
    return root, run_processes(_run_checks, root, list(GLOO_CHECKS))


def results_of(gloo: tuple[Path, list[dict]], name: str) -> list[dict]:
    per_rank = [r[name] for r in gloo[1]]
    for rank, res in enumerate(per_rank):
        if isinstance(res, dict) and "error" in res:
            pytest.fail(f"{name} failed in rank {rank}:\n{res['error']}")
    return per_rank


def launch_command(num_processes: int, target: list[str], *, port: int | None = None) -> tuple[list[str], dict]:
    """(argv, env) that start `num_processes` data-parallel processes running `target` (a script path and
    its arguments, or ["-m", "anima_trainer", "train", "--config_file", X]) through `accelerate launch`.

    On a machine without CUDA, `accelerate launch --cpu --num_processes N` starts ONE process (its simple
    launcher; N processes only through mpirun), and `--multi_gpu` starts N processes that each believe they
    are alone unless accelerate is told to use the CPU: ACCELERATE_USE_CPU=1 (or `Accelerator(cpu=True)`,
    which `needs_cpu_backend()` answers) makes them one gloo group.  This command does both parts."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port or free_port()), *target]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return argv, env


# ------------------------------------------------------------------------------------------ sharding --

@pytest.mark.parametrize(("num_batches", "world", "expected"), [
    (4, 1, [[0, 1, 2, 3]]),
    (4, 2, [[0, 2], [1, 3]]),
    (5, 2, [[0, 2, 4], [1, 3, 0]]),          # uneven: rank 1 wraps around to batch 0
    (7, 3, [[0, 3, 6], [1, 4, 0], [2, 5, 1]]),
    (6, 3, [[0, 3], [1, 4], [2, 5]]),
    (3, 4, [[0], [1], [2], [0]]),            # fewer batches than processes
    (1, 4, [[0], [0], [0], [0]]),
    (8, 4, [[0, 4], [1, 5], [2, 6], [3, 7]]),
    (0, 2, [[], []]),
])
def test_shard_batches_table(num_batches, world, expected):
    shards = [shard_batches(num_batches, r, world) for r in range(world)]
    assert shards == expected


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("num_batches", range(1, 12))
def test_shards_are_even_cover_the_epoch_and_match_total_steps(num_batches, world):
    shards = [shard_batches(num_batches, r, world) for r in range(world)]
    per_rank = -(-num_batches // world)
    assert all(len(s) == per_rank for s in shards)  # every process steps at the same micro-batches
    # global batch j = micro-batch j of every rank: positions j·world .. j·world+world-1 of the (wrapped) plan
    flat = [shards[r][j] for j in range(per_rank) for r in range(world)]
    assert flat == [p % num_batches for p in range(per_rank * world)]
    assert set(flat) == set(range(num_batches))
    from anima_trainer.train.loop import total_steps

    cfg = SimpleNamespace(gradient_accumulation_steps=2, max_train_epochs=3, max_train_steps=0)
    steps, epochs = total_steps(cfg, num_batches, world)
    assert (steps, epochs) == (3 * -(-per_rank // 2), 3)  # what each process really steps


def test_shard_batches_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError):
        shard_batches(4, 2, 2)


def test_single_process_is_a_no_op():
    d = Distributed()
    assert d.is_main and not d.enabled and d.shard(3) == [0, 1, 2] and all(d.owns(i) for i in range(5))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    d.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert d.reduce_mean(torch.tensor(3.0)).item() == 3.0
    assert d.gather_objects({"a": 1}) == [{"a": 1}] and d.scatter_objects(["x"]) == "x"
    assert d.any_true(True) and not d.all_true(False)
    with d.main_first():
        pass
    assert d.build_cache(lambda owned: owned, to_disk=True) is None  # one process: builds everything
    assert d.seed(42) == 42
    assert take_owned({"a": 1, "b": 2, "c": 3}, lambda j: j % 2 == 0) == {"a": 1, "c": 3}


# ---------------------------------------------------------------------------------- collectives (gloo) --

def _collectives(d: Distributed, out: Path) -> dict:
    r = d.rank
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    c = torch.nn.Parameter(torch.zeros(5))      # no gradient anywhere: stays None
    half = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # another dtype, grad only on rank 1
    a.grad = torch.arange(6.0).view(2, 3) * (r + 1)
    b.grad = torch.full((4,), 10.0 * (r + 1)) if r == 0 else None  # rank 1 used no b: counts as zeros
    if r == 1:
        half.grad = torch.tensor([4.0, 8.0], dtype=torch.float64)
    d.average_gradients([a, b, c, half])
    own = torch.nn.Parameter(torch.full((3,), float(r + 7)))
    d.broadcast_parameters([own])
    return {"a": a.grad, "b": b.grad, "c": c.grad, "half": half.grad, "own": own.detach(),
            "mean": d.reduce_mean(torch.tensor([float(r), 2.0 * r])),
            "any": d.any_true(r == 1), "all": d.all_true(r == 1), "all_both": d.all_true(True),
            "gathered": d.gather_objects({"rank": r, "t": torch.tensor([r])}),
            "scattered": d.scatter_objects([f"for {k}" for k in range(d.world_size)] if d.is_main else None)}


@pytest.mark.parametrize("check", ["collectives", "control_group"])
def test_collectives_over_two_gloo_processes(gloo, check):
    for r, res in enumerate(results_of(gloo, check)):
        torch.testing.assert_close(res["a"], torch.arange(6.0).view(2, 3) * 1.5, rtol=0, atol=0)
        torch.testing.assert_close(res["b"], torch.full((4,), 5.0), rtol=0, atol=0)
        assert res["c"] is None
        assert res["half"].dtype == torch.float64
        torch.testing.assert_close(res["half"], torch.tensor([2.0, 4.0], dtype=torch.float64), rtol=0, atol=0)
        assert torch.equal(res["own"], torch.full((3,), 7.0))  # rank 0's values everywhere
        assert torch.equal(res["mean"], torch.tensor([0.5, 1.0]))
        assert res["any"] and not res["all"] and res["all_both"]
        assert [g["rank"] for g in res["gathered"]] == [0, 1]
        assert res["scattered"] == f"for {r}"


def _main_first(d: Distributed, out: Path) -> dict:
    marker = out / "written_by_main"
    with d.main_first():
        if d.is_main:
            time.sleep(0.5)  # the others would see nothing yet if they did not wait
            marker.write_text("done", encoding="utf-8")
            seen = True
        else:
            seen = marker.is_file()
    return {"seen": seen}


def test_main_first_runs_the_main_process_before_the_others(gloo):
    main, other = results_of(gloo, "main_first")
    assert main["seen"] and other["seen"]


# ------------------------------------------------------------------------------- RNG states per rank --

def _draws() -> list:
    return [torch.randn(3), torch.rand(2), random.random(), float(np.random.rand())]


def _rng_states(d: Distributed, out: Path) -> dict:
    from anima_trainer.train.training_state import capture_rng, restore_rng

    seed = d.seed(5)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    _draws()  # advance every stream a little
    states = d.gather_objects(capture_rng())
    expected = _draws()
    folder = out / "state"
    if d.is_main:
        folder.mkdir()
        write_rank_rngs(folder, states)
    d.barrier()

    def scramble() -> None:
        torch.manual_seed(999)
        random.seed(999)
        np.random.seed(999)

    scramble()
    restore_rng(read_rank_rng(folder, d.rank, d.world_size))
    from_file = _draws()
    scramble()
    restore_rng(d.scatter_objects(states if d.is_main else None))
    scattered = _draws()
    return {"expected": expected, "from_file": from_file, "scattered": scattered,
            "world": saved_world_size(folder)}


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


def test_rng_states_are_gathered_saved_and_restored_per_rank(gloo):
    r0, r1 = results_of(gloo, "rng_states")
    state = gloo[0] / "rng_states" / "state"
    for res in (r0, r1):
        assert _same(res["from_file"], res["expected"])   # each rank continues its own streams
        assert _same(res["scattered"], res["expected"])
        assert res["world"] == 2
    assert not _same(r0["expected"], r1["expected"])      # the processes draw different noise
    with pytest.raises(ConfigError, match="saved by 2 process"):
        read_rank_rng(state, 0, 1)                         # another number of processes: refused
    with pytest.raises(ConfigError, match="saved by 2 process"):
        check_state_world(state, 3)


def test_single_process_states_are_unchanged_and_refused_by_more_processes(tmp_path):
    write_rank_rngs(tmp_path, [{"generator": torch.zeros(3)}])
    assert list(tmp_path.iterdir()) == []                 # nothing added to a single-process state
    assert saved_world_size(tmp_path) == 1 and read_rank_rng(tmp_path, 0, 1) is None
    with pytest.raises(ConfigError, match="saved by 1 process"):
        check_state_world(tmp_path, 2)


# ------------------------------------------------------------------------------- caching split (gloo) --

class _CountingVAE:
    """Deterministic stand-in for the VAE (16 channels at 1/8 size) that counts the images it encodes."""

    def __init__(self) -> None:
        self.encoded = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += len(images)
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        return torch.cat([pooled * (k + 1) for k in range(6)], dim=1)[:, :16].unsqueeze(2)


def _dataset(folder: Path):
    from anima_trainer.data import build_dataset, load_dataset_config

    return build_dataset(load_dataset_config(folder / "dataset.toml"), default_batch_size=2)


def _cache_split(d: Distributed, out: Path) -> dict:
    from anima_trainer.cache import cache_latents

    ds, vae = _dataset(out.parent), _CountingVAE()
    shares = []

    def build(owned):
        cache, summary = cache_latents(ds, vae, vae_fingerprint="test-vae", dtype=torch.float32, to_disk=True,
                                       batch_size=2, progress=False, owned=owned)
        shares.append((sorted(i for i, _ in cache), summary.built, summary.reused))
        return cache

    cache = d.build_cache(build, to_disk=True)
    errors = []
    for failing in (1, 0):
        def broken(owned, failing=failing):
            if owned is not None and d.rank == failing:
                raise ValueError(f"rank {failing} cannot read an image")
            return build(owned)
        try:
            d.build_cache(broken, to_disk=True)
        except Exception as e:  # noqa: BLE001 - the type is what the test checks
            errors.append(type(e).__name__)
    return {"shares": shares[:2], "encoded": vae.encoded, "errors": errors,
            "latents": {k: v["latent"] for k, v in cache.items()}}


def test_disk_cache_is_split_over_processes_then_read_by_all(gloo):
    from anima_trainer.cache.store import CACHE_FOLDER

    images = gloo[0] / "images"
    r0, r1 = results_of(gloo, "cache_split")
    # first pass: each process built exactly its own items (index % 2 == rank), nothing else
    assert r0["shares"][0] == ([0, 2, 4], 3, 0) and r1["shares"][0] == ([1, 3], 2, 0)
    # second pass: every process reads all 5 entries that are now on disk
    assert r0["shares"][1] == ([0, 1, 2, 3, 4], 0, 5) and r1["shares"][1] == r0["shares"][1]
    assert (r0["encoded"], r1["encoded"]) == (3, 2)   # no image was encoded twice
    assert len(list((images / CACHE_FOLDER).glob("*.safetensors"))) == 5
    assert not list((images / CACHE_FOLDER).glob("*.tmp"))
    for key, latent in r0["latents"].items():
        assert torch.equal(latent, r1["latents"][key])
    # a failure in one process is raised in every process (nobody waits forever at the barrier)
    assert r1["errors"] == ["ValueError", "RuntimeError"] and r0["errors"] == ["RuntimeError", "ValueError"]


# ------------------------------------------------------------- the key check: DDP gradient == big batch --

GLOBAL_BATCH = 4


def _tiny_model(dit_path: Path):
    from anima_trainer.models import load_dit
    from anima_trainer.networks import create_network

    # float64 throughout: the comparison checks the sharding and averaging, not fp32 kernel round-off
    dit = load_dit(dit_path, dtype=torch.float64)
    net = create_network(dit, algo="lora", dim=4, alpha=4).double()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero up factors: every factor gets a gradient
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.05)
    return dit, net


def _global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    f64 = torch.float64
    return {"latents": torch.randn(GLOBAL_BATCH, 16, 1, 8, 8, generator=gen, dtype=f64),
            "context": torch.randn(GLOBAL_BATCH, 512, 64, generator=gen, dtype=f64),
            "noise": torch.randn(GLOBAL_BATCH, 16, 1, 8, 8, generator=gen, dtype=f64),
            "sigma": torch.rand(GLOBAL_BATCH, generator=gen, dtype=f64).clamp(0.05, 0.95)}


def _loss(dit, batch: dict, indices: list[int]) -> torch.Tensor:
    from anima_trainer.train.flow import flow_loss, noisy_input

    x0, noise, sigma = batch["latents"][indices], batch["noise"][indices], batch["sigma"][indices]
    pred = dit(noisy_input(x0, noise, sigma), sigma, batch["context"][indices])
    return flow_loss(pred, noise - x0, sigma)


def _grads_and_step(net) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = net.trainable_parameters()
    grads = [p.grad.clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    opt.step()
    return grads, [p.detach().clone() for p in params]


def _ddp_gradient(d: Distributed, out: Path) -> dict:
    dit_path = out.parent / "tiny_dit.safetensors"
    dit, net = _tiny_model(dit_path)
    batch = _global_batch()
    result = {}
    # per-process batch 2: the epoch plan has 2 batches, this process runs its shard of them
    plan = [[0, 1], [2, 3]]
    for k in d.shard(len(plan)):
        _loss(dit, batch, plan[k]).backward()
    result["local"] = [p.grad.clone() for p in net.trainable_parameters()]
    d.average_gradients(net.trainable_parameters())
    result["batch2"] = _grads_and_step(net)
    # per-process batch 1 with gradient accumulation 2: 4 one-sample batches, 2 micro-batches per process
    dit, net = _tiny_model(dit_path)
    plan = [[0], [1], [2], [3]]
    shard = d.shard(len(plan))
    for k in shard:
        (_loss(dit, batch, plan[k]) / len(shard)).backward()
    d.average_gradients(net.trainable_parameters())
    result["accum"] = _grads_and_step(net)
    return result


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b, strict=True))


def test_two_process_lora_gradient_equals_the_single_process_gradient_of_the_global_batch(gloo):
    r0, r1 = results_of(gloo, "ddp_gradient")
    dit, net = _tiny_model(gloo[0] / "tiny_dit.safetensors")
    _loss(dit, _global_batch(), list(range(GLOBAL_BATCH))).backward()  # one process, the whole batch
    grads, weights = _grads_and_step(net)
    assert all(g.norm() > 0 for g in grads)
    assert _relative_error(r0["local"], grads) > 1e-2  # one process's own gradient is far from it
    for res in (r0, r1):
        for mode in ("batch2", "accum"):
            ddp_grads, ddp_weights = res[mode]
            assert _relative_error(ddp_grads, grads) < 1e-6, mode
            assert _relative_error(ddp_weights, weights) < 1e-6, mode
    for mode in ("batch2", "accum"):  # the processes hold bit-identical gradients and weights
        assert all(torch.equal(x, y) for x, y in zip(r0[mode][0], r1[mode][0], strict=True))
        assert all(torch.equal(x, y) for x, y in zip(r0[mode][1], r1[mode][1], strict=True))


# --------------------------------------------------------------------- launching and what is refused --

PROBE = """
import json, sys
import torch
from accelerate import Accelerator
from anima_trainer.train.distributed import Distributed, needs_cpu_backend
acc = Accelerator(mixed_precision="no", cpu=needs_cpu_backend())
d = Distributed.from_accelerator(acc)
mean = d.reduce_mean(torch.tensor([float(d.rank)])).item()
backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
with open(f"{sys.argv[1]}/rank{d.rank}.json", "w") as f:
    json.dump({"rank": d.rank, "world": d.world_size, "backend": backend, "mean": mean,
               "type": str(acc.distributed_type), "main": d.is_main}, f)
d.shutdown()
"""


def test_launch_command_starts_a_gloo_group(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    argv, env = launch_command(2, [str(probe), str(tmp_path)])
    env.pop("ACCELERATE_USE_CPU")  # needs_cpu_backend() alone must be enough when Accelerator gets it
    env["HF_HOME"] = str(tmp_path / "hf")  # no user accelerate config
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["main"] for r in ranks] == [True, False]
    for r in ranks:
        assert (r["world"], r["backend"], r["mean"]) == (2, "gloo", 0.5)
        assert r["type"].endswith("MULTI_CPU")


def test_needs_cpu_backend_only_for_a_multi_process_launch_without_gpu():
    assert not needs_cpu_backend({})
    assert not needs_cpu_backend({"WORLD_SIZE": "1"})
    assert needs_cpu_backend({"WORLD_SIZE": "2"}) == (not torch.cuda.is_available())


@pytest.mark.parametrize(("kind", "words"), [("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed"),
                                             ("MEGATRON_LM", "Megatron"), ("XLA", "TPU")])
def test_fsdp_and_deepspeed_are_refused_with_a_clear_message(kind, words):
    from accelerate.utils import DistributedType

    acc = SimpleNamespace(distributed_type=DistributedType[kind], num_processes=2)
    with pytest.raises(ConfigError, match=words) as err:
        check_supported(acc)
    assert "--multi_gpu" in str(err.value)


def test_data_parallel_accelerators_are_accepted(monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    acc = Accelerator(mixed_precision="no")  # as the loop makes it (accelerate's state is process-wide)
    d = Distributed.from_accelerator(acc)
    assert (d.rank, d.world_size, d.is_main, d.enabled, d.device) == (0, 1, True, False, torch.device(acc.device))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for kind in ("MULTI_GPU", "MULTI_CPU"):
        check_supported(SimpleNamespace(distributed_type=DistributedType[kind], num_processes=2))
    # 2 processes launched, but accelerate set each up alone (no GPU and no cpu=True): refused
    with pytest.raises(ConfigError, match="2 processes were launched but accelerate set up 1"):
        check_supported(SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1))


def test_python_dash_m_anima_trainer_is_the_cli(tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["anima_trainer", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("anima_trainer", run_name="__main__", alter_sys=True)
    assert done.value.code == 0 and "anima-trainer" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["anima_trainer", "inspect", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("anima_trainer", run_name="__main__", alter_sys=True)
    assert done.value.code == 2 and "error:" in capsys.readouterr().err


def test_only_the_main_process_logs_at_info(monkeypatch):
    import logging

    from anima_trainer.__main__ import _quiet_other_ranks

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setenv("RANK", "0")
    _quiet_other_ranks()
    assert root.handlers == [] and root.level == logging.INFO  # the main process: cli.main configures it
    monkeypatch.setenv("RANK", "1")
    _quiet_other_ranks()
    assert root.level == logging.WARNING and "[rank 1]" in root.handlers[0].formatter._fmt


GLOO_CHECKS = {"collectives": _collectives, "control_group": _collectives, "main_first": _main_first,
               "rng_states": _rng_states, "cache_split": _cache_split, "ddp_gradient": _ddp_gradient}
