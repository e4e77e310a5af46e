"""Multi-host training simulated on one machine: 2 processes x 2 CPU devices (gloo collectives on 127.0.0.1)
against 1 process x 4 devices. Each run is a few tiny_comb steps; every process has a timeout so nothing hangs.

The runs are module fixtures shared by the tests: one process, 4 steps; two processes, 4 steps (checkpoints at
steps 2 and 4); two processes stopped after step 2 then resumed; that step-2 checkpoint resumed by one process;
and the 4-step run with a damaged shard in step 4, resumed by two processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 900  # a loaded CI runner; an idle 2-core machine needs about a minute per run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(tmp_path: Path, name: str, num_processes: int, devices_each: int, **args) -> dict:
    """Start `num_processes` workers (each with `devices_each` CPU devices), wait for all, return the primary's
    {"losses", ..., "params": {name: array}, "process": [each process's {"start_step", "rows", "epoch_indices"}]}."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / name
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(
                 dict(args, process_id=i, num_processes=num_processes, port=port, out=str(out)))],
                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} of {name} exited {p.returncode}:\n" + "\n".join(logs)[-6000:]
    result = json.loads(out.with_suffix(".json").read_text())
    with np.load(out.with_suffix(".npz")) as params:
        result["params"] = dict(params)
    result["process"] = [json.loads(Path(f"{out}.process{i}.json").read_text()) for i in range(num_processes)]
    return result


# The gradient all-reduce sums in another order across processes than inside one: the losses agree exactly, the
# parameters to a few float32 ulps of the gradient, which AdamW turns into up to ~lr/2500 per step on weights whose
# gradient is near zero; at lr 1e-3, 4 steps stay within 1e-6 (at lr 1e-2 they reach 4e-6).
LR = ["learning_rate=1e-3"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    return tmp, run_processes(tmp, "one", 1, 4, run_dir=str(tmp / "run"), overrides=LR)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    return tmp, run_processes(tmp, "two", 2, 2, run_dir=str(tmp / "run"), overrides=LR)


def test_two_processes_train_like_one(one_process, two_processes):
    (_, one), (_, two) = one_process, two_processes
    assert (one["processes"], one["devices"], two["processes"], two["devices"]) == (1, 4, 2, 4)
    assert len(two["losses"]) == 4
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)
    assert one["params"].keys() == two["params"].keys()
    for k in one["params"]:
        np.testing.assert_allclose(two["params"][k], one["params"][k], rtol=0, atol=1e-6, err_msg=k)


def test_metrics_have_one_line_per_step(two_processes):
    tmp, _ = two_processes
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def assert_same_params(got: dict, want: dict, atol: float = 1e-6):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg=k)


# ----------------------------------------------------------------------------------------------------------
# Resume: stopped after step 2 (its checkpoint), then resumed to step 4, by two processes and by one


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    run = tmp / "run"
    first = run_processes(tmp, "first", 2, 2, run_dir=str(run), overrides=LR, stop_after=2)
    shutil.copytree(run, tmp / "run_for_one")  # as the stopped run left it: steps 1-2, checkpoint 2
    second = run_processes(tmp, "second", 2, 2, run_dir=str(run), overrides=LR, resume=True)
    return tmp, first, second


def test_two_processes_resume_like_uninterrupted(two_processes, resumed):
    (_, whole), (tmp, first, second) = two_processes, resumed
    assert (first["end_step"], [p["start_step"] for p in second["process"]], second["end_step"]) == (2, [2, 2], 4)
    np.testing.assert_allclose(first["losses"] + second["losses"], whole["losses"], rtol=1e-6)
    assert_same_params(second["params"], whole["params"])
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    # every process's iterator state is in the checkpoint (the same one: the global batch index)
    data = tmp / "run" / "checkpoints" / "2" / "data" / "metadata"  # Orbax's JsonSave file
    assert json.loads(data.read_text()) == {"per_process": [{"next_index": 2}] * 2}


@pytest.fixture(scope="module")
def one_resumes_two(resumed):
    tmp = resumed[0]
    return run_processes(tmp, "one_resumes", 1, 4, run_dir=str(tmp / "run_for_one"), overrides=LR, resume=True)


def test_two_process_checkpoint_restores_in_one_process(two_processes, one_resumes_two):
    (tmp, whole), one = two_processes, one_resumes_two
    # the trainable params of step 4 as serving and export read them (this pytest process: one process)
    from comb_jax.config import load_config
    from comb_jax.weights.run_dir import restore_comb_params

    comb = restore_comb_params(str(tmp / "run"), load_config("tiny_comb"), prefer="latest")
    import jax

    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(comb)[0]}
    assert_same_params(flat, whole["params"], atol=0)
    # the whole training state of step 2 (params, AdamW, data iterator) resumed by 1 process x 4 devices
    assert (one["processes"], one["start_step"], one["end_step"]) == (1, 2, 4)
    np.testing.assert_allclose(one["losses"], whole["losses"][2:], rtol=1e-6)
    assert_same_params(one["params"], whole["params"])


# ----------------------------------------------------------------------------------------------------------
# Data: each process reads only its rows


def test_processes_read_disjoint_rows_that_cover_an_epoch(one_process, two_processes):
    (_, one), (_, two) = one_process, two_processes
    assert [p["rows"] for p in two["process"]] == [[0, 2], [2, 4]]
    mine = [sorted(i for batch in p["epoch_indices"] for i in batch) for p in two["process"]]
    assert not set(mine[0]) & set(mine[1])
    assert sorted(mine[0] + mine[1]) == list(range(16))  # one epoch of 16 examples: 4 batches of 4
    # the global batch is the one-process batch row for row
    [whole] = [p["epoch_indices"] for p in one["process"]]
    assert [a + b for a, b in zip(*(p["epoch_indices"] for p in two["process"]))] == whole


def test_process_rows_collate_to_the_global_batch():
    """What each process tokenizes, padded to the agreed buckets and stacked, is the one-process batch."""
    from train_helpers import toy_examples

    from comb_jax.config import apply_overrides, load_config
    from comb_jax.text.codec import make_codec
    from comb_jax.training import data as data_lib

    cfg = apply_overrides(load_config("tiny_comb"), ["batch_size=4", "train.chunk_buckets=(16,32,64)"])
    examples = toy_examples(16)
    examples[5] = examples[5].__class__(examples[5].id, ("x" * 40,) + examples[5].chunks[1:], examples[5].question,
                                        examples[5].answer, examples[5].golds)
    codec = make_codec(cfg)
    whole = data_lib.train_dataset(examples, codec, cfg.train, 0)
    parts = [data_lib.train_dataset(examples, codec, cfg.train, 0, rows) for rows in (slice(0, 2), slice(2, 4))]
    for i in range(8):  # two epochs
        shapes = {k: v.shape for k, v in whole[i].items()}
        stacked = {k: np.concatenate([data_lib.pad_to(p[i], shapes)[k] for p in parts]) for k in shapes}
        for k in shapes:
            np.testing.assert_array_equal(stacked[k], whole[i][k], err_msg=f"batch {i} {k}")


# ----------------------------------------------------------------------------------------------------------
# A damaged shard in the latest step: both processes fall back to the same earlier step


def damage_a_shard(step_dir: Path) -> Path:
    """Truncate the largest data file of the step's params (an Orbax OCDBT data file): it no longer restores."""
    files = [p for p in (step_dir / "comb").rglob("*") if p.is_file() and not p.name.startswith(("_", "."))]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim


@pytest.fixture(scope="module")
def damaged(two_processes):
    tmp = two_processes[0]
    run = tmp / "damaged_run"
    shutil.copytree(tmp / "run", run)
    damage_a_shard(run / "checkpoints" / "4")
    return run, run_processes(tmp, "damaged", 2, 2, run_dir=str(run), overrides=LR, resume=True)


def test_damaged_latest_step_falls_back_on_both_processes(two_processes, damaged):
    (_, whole), (run, got) = two_processes, damaged
    assert [p["start_step"] for p in got["process"]] == [2, 2]
    np.testing.assert_allclose(got["losses"], whole["losses"][2:], rtol=1e-6)
    assert_same_params(got["params"], whole["params"])
    # moved aside once (by the primary), and step 4 saved again
    assert sorted(p.name for p in (run / "checkpoints.corrupt").iterdir()) == ["4"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


# ----------------------------------------------------------------------------------------------------------
# Paths


def test_checkpoint_urls_stay_urls():
    from comb_jax.weights.run_dir import as_path, checkpoint_root

    assert str(checkpoint_root("gs://bucket/run")) == "gs://bucket/run/checkpoints"
    assert str(checkpoint_root("s3://b/r/")).rstrip("/") == "s3://b/r/checkpoints"
    assert str(as_path("relative/run")) == str(Path("relative/run").resolve())


# ----------------------------------------------------------------------------------------------------------
# The command lines share the multi-host flags


@pytest.mark.parametrize("prog", ["train.py", "python -m comb_jax.eval", "python -m comb_jax.export"])
def test_command_lines_take_the_multihost_flags(prog, tmp_path, capsys):
    from comb_jax.cli import export
    from comb_jax.cli import train as train_cli
    from comb_jax.eval import harness

    main = {"train.py": train_cli.main, "python -m comb_jax.eval": harness.main,
            "python -m comb_jax.export": export.main}[prog]
    args = ["--config", "tiny_comb", "--coordinator", "127.0.0.1:1", "--num-processes", "2"]
    if prog.endswith("export"):
        args += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:  # --process-id missing: refused before anything runs
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error: a multi-process run needs all of --coordinator") and "\n" not in err


# ----------------------------------------------------------------------------------------------------------
# A hybrid ICI x DCN mesh over several slices (fake devices: only their slice and process matter)


class FakeDevice:
    platform = device_kind = "cpu"

    def __init__(self, id: int, process_index: int, slice_index: int):
        self.id, self.process_index, self.slice_index = id, process_index, slice_index

    def __repr__(self):
        return f"FakeDevice({self.id})"


def test_hybrid_mesh_puts_slices_on_the_dcn_axes():
    from comb_jax.config import MeshConfig
    from comb_jax.model.sharding import device_grid

    tpus = [FakeDevice(i, i // 2, i // 4) for i in range(8)]  # 2 slices of 2 hosts of 2 chips
    slice_of = lambda grid: np.vectorize(lambda d: d.slice_index)(grid)
    # several slices and no dcn_*: the slices split the data axis
    grid = device_grid(MeshConfig(data=-1, fsdp=2, tensor=1), tpus)
    assert grid.shape == (4, 2, 1) and slice_of(grid)[:, :, 0].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
    grid = device_grid(MeshConfig(data=1, fsdp=-1, tensor=2, dcn_fsdp=2), tpus)
    assert grid.shape == (1, 4, 2) and slice_of(grid)[0].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert all(len({d.process_index for d in row}) == 1 for row in grid.reshape(-1, 2))  # tensor inside a host
    with pytest.raises(ValueError, match="needs 4 slices, have 2"):
        device_grid(MeshConfig(dcn_data=4), tpus)
    # no slices (a GPU cluster): dcn_* > 1 makes each process one
    gpus = [FakeDevice(i, i // 4, 0) for i in range(8)]
    grid = device_grid(MeshConfig(data=-1, dcn_data=2), gpus)
    assert grid.shape == (8, 1, 1) and [d.process_index for d in grid.flat] == [0] * 4 + [1] * 4
    assert device_grid(MeshConfig(data=-1), gpus).shape == (8, 1, 1)  # one granule: the plain mesh


def test_dry_run_compiles_on_a_two_process_mesh(tmp_path):
    """`train.py --dry-run` on 2 processes x 2 simulated devices: one report, for the mesh over all 4."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", "tiny_comb", "--dry-run",
                               "--devices", "2", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "mesh.fsdp=2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err for _, err in outs)[-4000:]
    report = json.loads(outs[0][0])
    assert outs[1][0].strip() == ""  # the primary reports
    assert (report["processes"], report["devices"], report["mesh"]) == (2, 4, {"data": 2, "fsdp": 2, "tensor": 1})
    assert report["per_device_memory_gib"]["arguments"] > 0


def run_weight_processes(tmp_path: Path, weights: Path, num_processes: int) -> list[dict]:
    """tests/multihost_weights_worker.py in `num_processes` processes over 4 CPU devices; each one's report."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // num_processes}",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
    out, port = tmp_path / f"weights{num_processes}", free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER.with_name("multihost_weights_worker.py")), json.dumps(
                 dict(process_id=i, num_processes=num_processes, port=port, weights=str(weights), out=str(out)))],
                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n" + "\n".join(logs)[-6000:]
    return [json.loads(Path(f"{out}.process{i}.json").read_text()) for i in range(num_processes)]


def test_each_process_reads_only_its_blocks_of_the_backbone(tmp_path):
    """A Hugging Face backbone read by 2 processes x 2 devices (fsdp 2, tensor 2): each process reads well under the
    whole file and holds exactly the whole file's blocks; the fingerprint (from what each process holds) equals the
    one of the whole backbone on one host; teacher answers from the sharded backbone (every process runs every
    batch) and from host copies (each process its share) equal one process's."""
    import jax

    from comb_jax.config import load_config
    from comb_jax.model.layout import init_params, model_layout
    from comb_jax.weights.release import export_llama

    cfg = load_config("tiny_comb")
    params = init_params(model_layout(cfg.model), jax.random.key(7))
    export_llama(cfg.model, params, tmp_path / "llama")
    one, = run_weight_processes(tmp_path, tmp_path / "llama", 1)
    two = run_weight_processes(tmp_path, tmp_path / "llama", 2)
    assert one["host_copy"] and not any(p["host_copy"] for p in two)
    for p in two:
        assert p["mismatched"] == []
        assert p["read"] < 0.7 * p["total"], f"a process read {p['read']} of {p['total']} elements"
        assert p["fingerprint_sharded"] == p["fingerprint_whole"] == one["fingerprint_whole"]
        assert p["answers_sharded"] == p["answers_host"] == one["answers_host"]
    assert two[0]["read"] + two[1]["read"] >= two[0]["total"]  # together they read all of it


def test_kv_packet_trains_on_two_processes_like_one(tmp_path):
    """objective=kvpacket on 2 processes x 2 devices: the losses and the trailer of 1 process x 4 devices, and the
    adapter file the eval and serving load is written (by process 0) with the gathered trailer."""
    from safetensors.numpy import load_file

    kv = LR + ["objective=kvpacket", "kvpacket_tokens=3", "targets=gold"]
    one = run_processes(tmp_path, "kv1", 1, 4, run_dir=str(tmp_path / "run1"), overrides=kv, steps=2)
    two = run_processes(tmp_path, "kv2", 2, 2, run_dir=str(tmp_path / "run2"), overrides=kv, steps=2)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-6)
    np.testing.assert_allclose(two["params"]["trailer"], one["params"]["trailer"], atol=1e-6)
    adapter = load_file(str(tmp_path / "run2" / "adapter.safetensors"))["trailer"]
    np.testing.assert_array_equal(adapter, two["params"]["trailer"])
