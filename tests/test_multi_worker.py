"""K-FAC under MultiWorkerMirroredStrategy: two worker processes train as one process.

Two workers on localhost (``TF_CONFIG``, loopback ports) each take half of every
global batch; the gradients, factor statistics, exact-Fisher products and losses
that K-FAC all-reduces must make their update equal to one process's on the
whole batch, through the adaptive damping and the inverse schedule
(``multi_worker_training.py`` holds the training).
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).with_name("multi_worker_training.py")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run(log: pathlib.Path, *arguments: str) -> subprocess.Popen:
    # Output to a file: TensorFlow's logging could fill a pipe nobody reads yet.
    with open(log, "w") as output:
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), *arguments],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=SCRIPT.parent.parent,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )


def _train_all(tmp_path: pathlib.Path, outs: list[pathlib.Path]) -> list[tuple[int, str]]:
    """Runs the two workers and the one-process run; each one's exit code and log."""
    ports = ",".join(str(p) for p in _free_ports(2))
    logs = [tmp_path / f"{out.stem}.log" for out in outs]
    processes = [_run(logs[i], str(out), "--worker", str(i), "--ports", ports) for i, out in enumerate(outs[:2])]
    try:
        processes.append(_run(logs[2], str(outs[2])))
        codes = [process.wait(timeout=300) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


def test_two_workers_train_as_one_process(tmp_path):
    outs = [tmp_path / "worker0.npz", tmp_path / "worker1.npz", tmp_path / "one.npz"]
    finished = _train_all(tmp_path, outs)
    if any(code != 0 and "address already in use" in log.lower() for code, log in finished):
        finished = _train_all(tmp_path, outs)  # a port taken between choosing and binding it
    for code, log in finished:
        assert code == 0, log[-4000:]
    one = np.load(tmp_path / "one.npz")
    for out in outs[:2]:
        worker = np.load(out)
        assert int(worker["replicas"]) == 2 and int(one["replicas"]) == 1
        assert worker.files == one.files and worker.files[0] == "replicas"
        for name in worker.files[1:]:
            if worker[name].dtype.kind != "f":
                np.testing.assert_array_equal(worker[name], one[name], err_msg=name)
                continue
            # Float32 all-reduce rounding only.
            scale = 1.0 + np.max(np.abs(one[name]), initial=0.0)
            np.testing.assert_allclose(worker[name], one[name], rtol=0, atol=1e-5 * scale, err_msg=name)
    # The adaptive damping moved, so its all-reduced ρ was exercised.
    damping = [name for name in one.files if name.endswith("_damping")]
    assert damping and float(one[damping[0]]) != 1.0
