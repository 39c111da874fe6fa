"""Multi-node launches on one machine: two "nodes" of one CPU rank each, every node its own DeepSpeed launcher
started with --no_ssh (as on a cluster without ssh, or under SLURM), in two network namespaces joined by a veth
pair (over loopback where they cannot be made); and the launch scripts' failure modes (bad hostfiles, an
unreachable master).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from earlybert_ds.ticket import Ticket

from conftest import REPO, free_port, tiny_run_args

STEPS = 16
ARGS = {"train.zero_stage": 2, "train.precision": "fp32", "train.steps": STEPS, "earlybert.max_search_steps": 12,
        "train.eval_every": 8, "log.wandb": "offline"}


def _env(**kw) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1", "EARLYBERT_DIST_TIMEOUT": "120", **kw}


def _hostfile(path: Path, text: str = "nodea slots=1\nnodeb slots=1\n") -> Path:
    path.write_text(text)
    return path


def _run_nodes(cmds: list[list[str]], envs: list[dict], logs: Path, timeout: float = 300) -> None:
    """Start one launcher per node at once (output to ``logs/nodeR.log``) and wait for all; each must exit with 0
    (a node still running at the timeout is killed and fails with its log)."""
    files = [open(logs / f"node{r}.log", "w") for r in range(len(cmds))]  # noqa: SIM115 - closed below
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
             for cmd, env, f in zip(cmds, envs, files)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # the nodes' logs are shown below
    finally:
        for p, f in zip(procs, files):
            if p.poll() is None:  # only the launchers this test started, and their ranks
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            f.close()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"node {r} failed ({p.returncode}):\n{(logs / f'node{r}.log').read_text()[-6000:]}"


def _check_two_node_run(out: Path, caches: list[Path]) -> None:
    """The pipeline ran across both nodes: one coordinator, one ticket on every rank, every rank its own shards."""
    ticket = Ticket.load(out / "ticket")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["ticket"]["step"] == ticket.step < STEPS
    assert summary["params_final"] < summary["params_full"]
    # both ranks (one per node) trained the efficient stage with the ticket rank 0 drew and broadcast
    ckpts = [d for d in (out / "checkpoints").glob("global_step*")
             if int(d.name.removeprefix("global_step")) > ticket.step]
    assert ckpts
    for ckpt in ckpts:
        assert {torch.load(ckpt / f"rank{r}.pt", weights_only=True)["ticket"] for r in (0, 1)} == {ticket.digest()}
        assert {re.search(r"zero_pp_rank_(\d+)_", p.name)[1] for p in ckpt.glob("*optim_states.pt")} == {"0", "1"}
    # only rank 0 logged: one wandb run, every step once
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    steps = [m["step"] for m in records if "loss" in m]
    assert steps == list(range(1, STEPS + 1))
    # each node prepared its own cache (local rank 0), to the same tokenizer and packed corpus
    names = [sorted(p.name for p in c.iterdir()) for c in caches]
    assert names[0] == names[1] and [n for n in names[0] if n.startswith("packed-")], names


def _netns_pair(stack: list[list[str]]) -> list[tuple[list[str], dict[str, str], str]] | None:
    """Two network namespaces joined by a veth pair, or None where they cannot be made (not root, no iproute2);
    ``stack`` collects the commands that undo them."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return None
    tag, subnet = f"eb{os.getpid() % 100000}", f"10.213.{os.getpid() % 250}"
    nodes = [(f"{tag}n{i}", f"{tag}v{i}", f"{subnet}.{i + 1}") for i in (0, 1)]
    steps = [("netns", "add", nodes[0][0]), ("netns", "add", nodes[1][0]),
             ("link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1])]
    for ns, dev, addr in nodes:
        steps += [("link", "set", dev, "netns", ns), ("-n", ns, "addr", "add", f"{addr}/24", "dev", dev),
                  ("-n", ns, "link", "set", dev, "up"), ("-n", ns, "link", "set", "lo", "up")]
    # deleting a namespace deletes the veth end inside it, and so the pair; else the pair is deleted here
    stack.append(["ip", "link", "del", nodes[0][1]])
    for step in steps:
        if subprocess.run(["ip", *step], capture_output=True).returncode:
            return None
        if step[0] == "netns":
            stack.append(["ip", "netns", "del", step[2]])
    return [(["ip", "netns", "exec", ns], {"GLOO_SOCKET_IFNAME": dev}, addr) for ns, dev, addr in nodes]


@pytest.fixture
def two_nodes():
    """Two "nodes" on this machine: two network namespaces joined by a veth pair, each reaching the other by its own
    10.x address (as root with iproute2), else both on loopback. Yields (command prefix, environment, address) per
    node."""
    undo: list[list[str]] = []
    try:
        yield _netns_pair(undo) or [([], {}, "127.0.0.1")] * 2
    finally:
        for cmd in reversed(undo):
            subprocess.run(cmd, capture_output=True)


@pytest.mark.slow
def test_two_nodes_without_ssh(corpus, tmp_path, two_nodes):
    """Each "node" started with launch/multinode_nossh.sh (`deepspeed --no_ssh --node_rank R`), as a cluster user
    would, its own data cache; between namespaces GLOO_SOCKET_IFNAME names the link."""
    hostfile, out, master = _hostfile(tmp_path / "hostfile"), tmp_path / "run", two_nodes[0][2]
    caches = [tmp_path / f"cache{r}" for r in (0, 1)]
    cmds = [[*prefix, "bash", "launch/multinode_nossh.sh", *tiny_run_args(corpus[0], caches[r], out, **ARGS)]
            for r, (prefix, _, _) in enumerate(two_nodes)]
    port = str(free_port())
    envs = [_env(NODE_RANK=str(r), HOSTFILE=str(hostfile), MASTER_ADDR=master, MASTER_PORT=port, **extra)
            for r, (_, extra, _) in enumerate(two_nodes)]
    _run_nodes(cmds, envs, tmp_path)
    _check_two_node_run(out, caches)


@pytest.mark.slow
def test_unreachable_master_fails_in_bounded_time(tmp_path):
    """Node 1 alone: nobody listens at MASTER_ADDR:MASTER_PORT; the rank gives up after about 1-2 timeouts with a
    message naming the address, the port and the timeout (timed from the rendezvous, after the start-up)."""
    port = str(free_port())
    env = _env(NODE_RANK="1", HOSTFILE=str(_hostfile(tmp_path / "hostfile")), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, EARLYBERT_DIST_TIMEOUT="5")
    proc = subprocess.Popen(["bash", "launch/multinode_nossh.sh", "--output-dir", str(tmp_path / "run")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, rendezvous = [], None
    watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))  # a hung rank fails the test, not CI
    watchdog.start()
    try:
        for line in proc.stdout:  # DeepSpeed prints this just before the process group's rendezvous
            lines.append(line)
            if rendezvous is None and "deepspeed_shm_comm_op built successfully" in line:
                rendezvous = time.monotonic()
        proc.wait(timeout=600)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    assert proc.returncode == 2 and rendezvous is not None, output[-4000:]
    assert f"rank 1 of 2 could not join the job at MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port} " \
           "(EARLYBERT_DIST_TIMEOUT = 5 s)" in output, output[-4000:]
    assert time.monotonic() - rendezvous < 30


def _refused(tmp_path: Path, script: str, text: str | None, node_rank: str, message: str) -> None:
    """``launch/SCRIPT`` stops at once with ``error: MESSAGE`` (``{h}`` the hostfile), status 2, nothing written."""
    hostfile = tmp_path / "hostfile"
    if text is not None:
        hostfile.write_text(text)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", f"launch/{script}", "--output-dir", str(tmp_path / "run")], cwd=REPO,
                          env=_env(NODE_RANK=node_rank, HOSTFILE=str(hostfile)), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message.format(h=hostfile)}"), proc.stderr
    assert time.monotonic() - t0 < 10 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    (None, "{h}: cannot read the hostfile (No such file or directory)"),
    ("nodea slots=1\nnodeb slot=1\n", "{h}:2: malformed line 'nodeb slot=1': expected 'HOST slots=N'"),
    ("nodea slots=1 extra\n", "{h}:1: malformed line 'nodea slots=1 extra'"),
    ("# nodes\nnodea slots=0\n", "{h}:2: malformed line 'nodea slots=0': expected 'HOST slots=N' with N >= 1"),
    ("nodea slots=1\nnodeb slots=1\n\nnodea slots=2\n", "{h}:4: host 'nodea' is already listed on line 1"),
    ("localhost slots=1\nlocalhost slots=1\n",
     "{h}:2: host 'localhost' is already listed on line 1 (on several nodes, name each by its own hostname)"),
    ("# no hosts\n\n", "{h}: no hosts"),
])
@pytest.mark.parametrize("script", ["multinode_nossh.sh", "multinode.sh"])
def test_bad_hostfile_is_refused_before_launching(tmp_path, script, text, message):
    _refused(tmp_path, script, text, "0", message)


def test_node_rank_outside_the_hostfile_is_refused(tmp_path):
    _refused(tmp_path, "multinode_nossh.sh", "nodea slots=1\nnodeb slots=1\n", "2",
             "{h}: node rank 2 is out of range: the hostfile lists 2 node(s), so NODE_RANK must be 0..1")


def test_slurm_script_starts_one_launcher_per_node(tmp_path):
    """launch/slurm.sbatch under stand-in `scontrol` and `srun` (two nodes): every node gets the same hostfile,
    its SLURM_NODEID as node rank and the first host as master; the arguments pass through untouched."""
    bin_dir, repo = tmp_path / "bin", tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    bin_dir.mkdir()
    fakes = {
        bin_dir / "scontrol": 'echo "$@" > "$FAKE_OUT/scontrol.args"; printf "gpu7\\ngpu8\\n"',
        bin_dir / "srun": 'echo "$@" > "$FAKE_OUT/srun.args"; while [[ $1 == -* ]]; do shift; done\n'
                          'for i in 0 1; do mkdir -p "$FAKE_OUT/tmp$i"; '
                          'SLURM_NODEID=$i TMPDIR="$FAKE_OUT/tmp$i" "$@" & done; wait',
        repo / "launch" / "multinode_nossh.sh": 'cp "$HOSTFILE" "$FAKE_OUT/hostfile$NODE_RANK"; '
                                                'printf "%s\\n" "$MASTER_ADDR:$MASTER_PORT" "$@" '
                                                '> "$FAKE_OUT/node$NODE_RANK"',
    }
    for path, body in fakes.items():
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE")}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(tmp_path),
           "SLURM_SUBMIT_DIR": str(repo), "SLURM_JOB_NODELIST": "gpu[7-8]", "SLURM_JOB_ID": "1234",
           "SLURM_CPUS_ON_NODE": "32", "SLURM_GPUS_ON_NODE": "4"})
    subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--output-dir", "/shared/run x", "--resume"],
                   env=env, check=True, timeout=30)
    assert (tmp_path / "scontrol.args").read_text().split() == ["show", "hostnames", "gpu[7-8]"]
    assert "--cpus-per-task=32" in (tmp_path / "srun.args").read_text()
    for r in (0, 1):
        assert (tmp_path / f"hostfile{r}").read_text() == "gpu7 slots=4\ngpu8 slots=4\n"
        assert (tmp_path / f"node{r}").read_text().splitlines() == ["gpu7:21234", "--output-dir", "/shared/run x",
                                                                     "--resume"]
