"""Loader: seeded order, exact resume, per-process rows, epochs, eval batches, global arrays."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxpt import data, errors

VAL, TRAIN = 1000, [997, 1013, 1000, 500, 3]  # shard sizes; windows cross shard boundaries
B, T = 8, 16


def synthetic(directory, sizes, val_shards=1, dtype="uint16", first=0) -> data.Manifest:
    """A data directory whose token at stream position p is `first + p`."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = (first + np.arange(sum(sizes))).astype(dtype)
    shards, offset = [], 0
    for i, n in enumerate(sizes):
        split = "val" if i < val_shards else "train"
        piece = tokens[offset : offset + n]
        data.write_shard(directory / f"{split}_{i:06d}.bin", piece)
        shards.append(data.Shard(f"{split}_{i:06d}.bin", split, n, int(piece.max())))
        offset += n
    manifest = data.Manifest(
        directory=directory,
        tokenizer={"kind": "gpt2"},
        vocab_size=int(tokens.max()) + 1,
        eot_id=0,
        dtype=dtype,
        source={"dataset": "synthetic"},
        shard_tokens=max(sizes),
        val_shards=val_shards,
        documents=1,
        shards=tuple(shards),
    )
    data.save_manifest(manifest)
    return data.load_manifest(directory)


@pytest.fixture()
def manifest(tmp_path) -> data.Manifest:
    return synthetic(tmp_path / "data", [VAL, *TRAIN])


def run(loader: data.Loader, state: dict, steps: int) -> tuple[list[np.ndarray], list[dict]]:
    """`steps` batches from `state`, and the state before each and after the last."""
    batches, states = [], [state]
    for _ in range(steps):
        batch, state = loader.next_batch(state)
        batches.append(batch)
        states.append(state)
    return batches, states


@pytest.mark.parametrize("dtype, first", [("uint16", 0), ("uint32", 70_000)])
def test_an_epoch_covers_each_window_once(tmp_path, dtype, first):
    manifest = synthetic(tmp_path, [VAL, *TRAIN], dtype=dtype, first=first)
    loader = data.Loader(manifest, "train", B, T)
    assert loader.tokens == sum(TRAIN) and loader.windows == (sum(TRAIN) - 1) // T - 1
    batches, states = run(loader, loader.init_state(seed=3), loader.steps_per_epoch)
    starts = np.concatenate([b[:, 0] for b in batches]) - first - VAL  # stream offsets
    for batch in batches:
        assert batch.shape == (B, T + 1) and batch.dtype == np.int32
        np.testing.assert_array_equal(batch, batch[:, :1] + np.arange(T + 1))  # contiguous
    assert len(set(starts % T)) == 1  # one shift per epoch
    assert len(set(starts)) == loader.steps_per_epoch * B  # no window twice
    assert states[-1]["epoch"] == 1 and states[-1]["step"] == 0


def test_same_seed_same_batches(manifest):
    a, b = data.Loader(manifest, "train", B, T), data.Loader(manifest.directory, "train", B, T)
    first, _ = run(a, a.init_state(seed=7), 5)
    second, _ = run(b, b.init_state(seed=7), 5)
    other, _ = run(b, b.init_state(seed=8), 5)
    np.testing.assert_array_equal(np.stack(first), np.stack(second))
    assert not np.array_equal(np.stack(first), np.stack(other))


@pytest.mark.parametrize("k", [0, 10, 26, 30])  # 27 steps per epoch: resume across its end
def test_resume_from_a_saved_state(manifest, k):
    loader = data.Loader(manifest, "train", B, T)
    batches, states = run(loader, loader.init_state(seed=1), 40)
    saved = json.loads(json.dumps(states[k]))  # what a checkpoint stores
    assert set(saved) == {"seed", "epoch", "step", "batch_size", "seq_len", "tokens", "data"}
    restored = data.Loader(manifest.directory, "train", B, T)
    resumed, _ = run(restored, saved, 40 - k)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(batches[k:]))


def test_a_saved_state_resumes_on_its_data_however_named_and_nowhere_else(manifest, tmp_path):
    """A state saved on one dataset went on mid-epoch on any other at least as large, reading
    that data at the old epoch's positions. The same tokens (through a symlink, a relative
    path, another dtype) resume; other tokens are refused."""
    loader = data.Loader(manifest, "train", B, T)
    batches, states = run(loader, loader.init_state(seed=2), 12)
    saved = json.loads(json.dumps(states[5]))
    (tmp_path / "link").symlink_to(manifest.directory)
    same = [
        tmp_path / "link",
        os.path.relpath(manifest.directory),
        synthetic(tmp_path / "wide", [VAL, *TRAIN], dtype="uint32").directory,
    ]
    for directory in same:
        resumed, _ = run(data.Loader(directory, "train", B, T), saved, 7)
        np.testing.assert_array_equal(np.stack(resumed), np.stack(batches[5:]))
    other = synthetic(tmp_path / "other", [VAL, *TRAIN[:-1], TRAIN[-1] + 200], first=1)
    loader = data.Loader(other.directory, "train", B, T)  # larger, each token one more
    assert not loader.holds(saved)
    with pytest.raises(errors.DataError, match="tokens of other data than the 'train' split"):
        loader.next_batch(saved)


def test_epochs_wrap_with_a_new_order(manifest):
    loader = data.Loader(manifest, "train", B, T)
    steps = loader.steps_per_epoch
    batches, states = run(loader, loader.init_state(), 2 * steps + 1)
    assert [s["epoch"] for s in states[::steps]] == [0, 1, 2]
    epoch0, epoch1 = (np.stack(batches[i * steps : (i + 1) * steps]) for i in (0, 1))
    assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize("n", [2, 4])
def test_processes_read_disjoint_parts_of_the_global_batch(manifest, n):
    whole = data.Loader(manifest, "train", B, T)
    parts = [
        data.Loader(manifest, "train", B, T, rows=np.arange(B)[i * B // n : (i + 1) * B // n])
        for i in range(n)
    ]
    state = whole.init_state(seed=5)
    for _ in range(30):  # across an epoch boundary
        batch, next_state = whole.next_batch(state)
        local = [part.next_batch(state) for part in parts]
        assert all(s == next_state for _, s in local)  # the state is global
        np.testing.assert_array_equal(np.concatenate([b for b, _ in local]), batch)
        starts = [set(b[:, 0]) for b, _ in local]
        assert sum(map(len, starts)) == len(set().union(*starts)) == B  # disjoint
        state = next_state


def test_eval_batches_are_fixed(manifest):
    loader = data.Loader(manifest, "val", B, T)
    batches = list(loader.eval_batches())
    assert len(batches) == (VAL - 1) // T // B == 7
    np.testing.assert_array_equal(np.stack(batches), np.stack(list(loader.eval_batches())))
    expected = (np.arange(7 * B) * T)[:, None] + np.arange(T + 1)  # windows k*T in order
    np.testing.assert_array_equal(np.concatenate(batches), expected)
    assert len(list(loader.eval_batches(3))) == 3
    second_half = data.Loader(manifest, "val", B, T, rows=range(B // 2, B))
    np.testing.assert_array_equal(next(second_half.eval_batches(1)), batches[0][B // 2 :])
    with pytest.raises(errors.DataError, match="too few for 8 batch"):
        list(loader.eval_batches(8))


def test_global_arrays_from_process_rows(manifest):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    loader = data.Loader(manifest, "train", B, T)
    batch, _ = loader.next_batch(loader.init_state())
    for spec in (PartitionSpec("data"), PartitionSpec()):
        sharding = NamedSharding(mesh, spec)
        rows = data.process_rows(sharding, (B, T))
        np.testing.assert_array_equal(rows, np.arange(B))  # one process holds every row
        inputs, targets = data.to_global(batch, sharding, B)
        assert inputs.shape == targets.shape == (B, T) and inputs.sharding == sharding
        np.testing.assert_array_equal(np.asarray(inputs), batch[:, :-1])
        np.testing.assert_array_equal(np.asarray(targets), batch[:, 1:])


def test_embedded_corpus_batches_are_text(tmp_path):
    manifest = data.prepare_embedded(tmp_path)
    loader = data.Loader(manifest, "train", 4, 32)
    data.check_vocab(loader, 50257)
    batch, _ = loader.next_batch(loader.init_state())
    text = data.tokenizer_for(manifest).decode(batch[0].tolist())
    assert len(text) > 32 and sum(c.isalpha() for c in text) > len(text) // 2


def test_loader_errors(manifest, tmp_path):
    loader = data.Loader(manifest, "train", B, T)
    state = loader.init_state()
    with pytest.raises(errors.DataError, match="resume with the same data, batch size"):
        data.Loader(manifest, "train", B // 2, T).next_batch(state)
    with pytest.raises(errors.DataError, match="rows must lie in"):
        data.Loader(manifest, "train", B, T, rows=[B])
    fields = r"lower train\.batch_size or model\.block_size, or use more data$"
    one_batch = r"1 batch\(es\) of 1000 \(train\.batch_size\); "
    with pytest.raises(errors.DataError, match=one_batch + fields):
        data.Loader(manifest, "train", 1000, T).init_state()
    with pytest.raises(errors.DataError, match="too few for 1 batch.*" + fields):  # "0 batch(es)"
        next(data.Loader(manifest, "val", 1000, T).eval_batches())
    with pytest.raises(errors.DataError, match=r"model\.vocab_size is 10;"):
        data.check_vocab(loader, 10)
    no_val = synthetic(tmp_path / "no_val", TRAIN, val_shards=0)
    with pytest.raises(errors.DataError, match="has no 'val' shards") as e:
        data.Loader(no_val, "val", B, T)
    assert "\n" not in str(e.value)


_PROCESS_SCRIPT = """
import json, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxpt import data

port, index, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
rows = data.process_rows(sharding, (8, 16))
loader = data.Loader(directory, "train", 8, 16, rows=rows)
batch, state = loader.next_batch(loader.next_batch(loader.init_state(seed=4))[1])
inputs, targets = data.to_global(batch, sharding, 8)
gathered = multihost_utils.process_allgather(inputs, tiled=True)
print(json.dumps({"rows": rows.tolist(), "inputs": np.asarray(gathered).tolist()}))
"""


def test_two_processes_assemble_the_global_batch(manifest):
    """Two JAX processes on localhost, 2 CPU devices each, build the single-process batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_SCRIPT, str(port), str(i), str(manifest.directory)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    results = [json.loads(out.splitlines()[-1]) for out, _ in outs]
    assert [r["rows"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    loader = data.Loader(manifest, "train", B, T)
    batch, _ = loader.next_batch(loader.next_batch(loader.init_state(seed=4))[1])
    for r in results:
        np.testing.assert_array_equal(np.array(r["inputs"]), batch[:, :-1])


def documented_batches(stream: np.ndarray, seed: int, steps: int, batch: int, seq: int) -> list:
    """The module docstring's rule as a python loop: epoch e draws, from an RNG seeded by
    (seed, e), a shift in [0, T) and a permutation of the W = (N - 1) // T - 1 windows of T + 1
    tokens at shift + k*T; step s is windows s*B ... s*B + B - 1 of it; a last part-batch of
    windows is left out, and the epoch after starts over (B, T + 1) each."""
    windows = (len(stream) - 1) // seq - 1
    out, epoch = [], 0
    while len(out) < steps:
        rng = np.random.default_rng([seed, epoch])
        shift, order = int(rng.integers(seq)), rng.permutation(windows)
        for s in range(windows // batch):
            starts = [shift + k * seq for k in order[s * batch : (s + 1) * batch]]
            out.append(np.stack([stream[a : a + seq + 1] for a in starts]))
        epoch += 1
    return out[:steps]


@pytest.mark.parametrize("b, t, k, n", [(8, 16, 30, 3), (3, 7, 100, 2), (5, 1, 999, 4)])
def test_batches_follow_the_documented_rule_in_any_process_split_and_resume(tmp_path, b, t, k, n):
    """Every batch over three epochs, across shard boundaries: one process; n processes
    resumed at step k from a state stored as JSON, whose rows together are the batch."""
    sizes = [VAL, *TRAIN]
    manifest = synthetic(tmp_path, sizes)
    stream = np.arange(VAL, sum(sizes))  # the train split; token p is p
    whole = data.Loader(manifest, "train", b, t)
    steps = 3 * whole.steps_per_epoch + 1
    expected = documented_batches(stream, 9, steps, b, t)
    batches, states = run(whole, whole.init_state(seed=9), steps)
    np.testing.assert_array_equal(np.stack(batches), np.stack(expected))
    k = min(k, steps - 1)
    rows = [np.arange(b)[i::n] for i in range(n)]  # interleaved, as a mesh may hold them
    parts = [data.Loader(manifest.directory, "train", b, t, rows=r) for r in rows]
    state = json.loads(json.dumps(states[k]))
    for step in range(k, steps):
        local = [part.next_batch(state) for part in parts]
        assembled = np.empty_like(expected[step])
        for r, (batch, _) in zip(rows, local, strict=True):
            assembled[r] = batch
        np.testing.assert_array_equal(assembled, expected[step])
        state = local[0][1]
