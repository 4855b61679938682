"""QAT on several processes: FSDP2 + torchrun + torch.distributed.checkpoint, on CPU with gloo.

Every distributed run is compared with a single-process oracle: the same QAT run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402

from paretoq_ao import recipe as rc  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
FAULT_WORKER = os.path.join(HERE, "_fault_worker.py")
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
STEPS = 4
COMMON = ["qat", "--model", "tiny", "--bits", "2", "--steps", str(STEPS), "--batch-size", "4", "--block-size", "32",
          "--max-chars", "200000", "--save-every", "2", "--no-progress", "--tiny-config", json.dumps(TINY)]
TOL = 2e-5


def recipe(out, **kw):
    args = dict(model="tiny", bits=2, steps=STEPS, batch_size=4, block_size=32, max_chars=200_000, save_every=2,
                progress=False, model_config=dict(TINY), output_dir=str(out))
    args.update(kw)
    return rc.QATRecipe(**args)


class Job:
    """``paretoq`` (or ``script``) under torchrun, started in the background; ``wait()`` returns
    (returncode, stdout + stderr) once it ends, and fails if it runs past ``timeout`` seconds."""

    started = []  # every job of this module (a test that depends on timing waits for them first)

    def __init__(self, args, nproc=2, script=None, env=None, timeout=300):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--monitor-interval=0.2"]
        cmd += [script] if script else ["-m", "paretoq_ao"]
        full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        full_env.pop("TRITON_INTERPRET", None)
        full_env.update(env or {})
        # files, not pipes: nothing reads the output while the job runs
        self.files = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.deadline = time.monotonic() + timeout
        self.proc = subprocess.Popen(cmd + list(args), stdout=self.files[0], stderr=self.files[1], text=True,
                                     env=full_env, cwd=HERE)
        self.result = None
        Job.started.append(self)

    def wait(self):
        if self.result is None:
            try:
                self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop()
                raise
            self._collect()
        return self.result

    def stop(self):
        """End the job if it still runs (torchrun stops its workers on SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.result is None:
            self._collect()

    def _collect(self):
        for f in self.files:
            f.seek(0)
        self.result = self.proc.returncode, "".join(f.read() for f in self.files)
        for f in self.files:
            f.close()


def torchrun(args, nproc=2, script=None, env=None, timeout=300):
    """Run ``paretoq`` (or ``script``) under torchrun; returns (returncode, stdout + stderr)."""
    return Job(args, nproc, script, env, timeout).wait()


def final_state(out):
    """The state dict of the QAT model in ``out``'s latest checkpoint (safetensors or DCP)."""
    from paretoq_ao.hf import load_qat_checkpoint

    model, _ = load_qat_checkpoint(rc.resolve_qat_checkpoint(out))
    return model.state_dict()


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def losses(out):
    return {rec["step"]: rec["loss"] for rec in rc.read_log(os.path.join(out, rc.LOG_NAME))}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """The uninterrupted single-process run: losses per step and the final state."""
    out = tmp_path_factory.mktemp("oracle")
    res = rc.run_qat(recipe(out))
    return {"losses": {i + 1: l for i, l in enumerate(res.losses)}, "state": final_state(out)}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-rank run from scratch: checkpoint 2 is saved, steps 3 and 4 train, and then the disk of
    rank 1 fills up while step 4 is saved, so the job fails (test_disk_full_... checks how) and
    leaves checkpoint 2, from which the tests below resume or inject other faults."""
    out = tmp_path_factory.mktemp("two_rank_run") / "run"
    code, log = torchrun(COMMON + ["--output-dir", str(out)], script=FAULT_WORKER,
                         env={"PARETOQ_TEST_FAULT": "diskfull:1:2"})  # rank 1's 2nd save: step 4
    assert os.path.basename(rc.latest_checkpoint(out) or "") == "checkpoint-00000002", log[-3000:]
    return {"out": out, "code": code, "log": log}


@pytest.fixture(scope="module")
def fresh_jobs(tmp_path_factory):
    """Two 2-rank jobs that need no other run, started together by the first test that reads
    either: "fsdp", tests/_fsdp_worker.py (whose last case is ``paretoq qat`` with a global batch
    of 3), and "compiled", the torch.compile run. The compiled run is the longest job by far; it
    goes on in the background while the tests in between run theirs (a job leaves a core idle much
    of the time: while torchrun starts, while its processes exit, in the gloo waits). Each test
    waits for the job it reads."""
    tmp = tmp_path_factory.mktemp("fresh_jobs")
    batch3 = [a if a != "4" else "3" for a in COMMON]  # --batch-size 3 (the only "4" besides --steps)
    batch3[batch3.index("--steps") + 1] = str(STEPS)
    jobs = {
        "fsdp": (Job([str(tmp / "report.json")] + batch3 + ["--output-dir", str(tmp / "batch3")],
                     script=os.path.join(HERE, "_fsdp_worker.py")), tmp),
        "compiled": (Job(COMMON + ["--output-dir", str(tmp / "compiled"), "--compile", "--stop-after", "2"],
                         timeout=600), tmp / "compiled"),
    }
    yield jobs
    for job, _ in jobs.values():  # a job whose test did not run
        job.stop()


@pytest.fixture(scope="module")
def fsdp_report(fresh_jobs):
    """The report of the "fsdp" job of fresh_jobs, and the output directory of its ``paretoq qat`` case."""
    job, tmp = fresh_jobs["fsdp"]
    code, log = job.wait()
    assert code == 0, log
    return json.loads((tmp / "report.json").read_text()), tmp / "batch3"


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- FSDP2 vs one process

def test_fsdp_matches_single_process_every_format(fsdp_report):
    """Every bit width, per-row and group scales, uneven shards, with/without activation
    checkpointing: losses, first gradients of latent weights and scales, and parameters after 3
    AdamW steps (with clipping) equal the single-process run's; parameters and optimizer state
    are sharded."""
    rep, _ = fsdp_report
    assert rep["world_size"] == 2
    assert len(rep["cases"]) == 12
    for name, c in rep["cases"].items():
        assert c["keys_equal"], name
        assert c["loss"] < 2e-6, (name, c)
        assert c["grad_weight"] <= 1e-5 * c["ref_grad_weight"] + 1e-9, (name, c)
        assert c["grad_scale"] <= 1e-4 * c["ref_grad_scale"] + 1e-10, (name, c)
        assert c["ref_grad_scale"] > 0, (name, c)
        assert c["param"] < 1e-6, (name, c)
        assert c["scale_moved"] > 1e-3, (name, c)  # the scales were trained, not left alone
        assert c["is_qat_linear"], (name, c)
        # 45 rows over 2 ranks: FSDP pads to 23 + 22; scales and optimizer state shard alike
        assert c["weight_local_rows"] == c["scale_local_rows"] == c["optim_state_local_rows"] == 23, (name, c)
        assert c["optim_state_dtensor"], (name, c)
    assert rep["guard"] is not None and "prepare_for_fsdp" in rep["guard"]


def test_prepare_for_fsdp_keeps_state_dict_and_outputs():
    from torchao import quantize_

    from paretoq_ao import ParetoQQATConfig
    from paretoq_ao.distributed import ParetoQQATLinear, prepare_for_fsdp
    from paretoq_ao.hf import qat_modules
    from conftest import _make_decoder

    a = _make_decoder()
    quantize_(a, ParetoQQATConfig(bits=1.58, group_size=16))
    import copy

    b = copy.deepcopy(a)
    names = prepare_for_fsdp(b)
    assert len(names) == 6 and all(isinstance(dict(b.named_modules())[n], ParetoQQATLinear) for n in names)
    assert prepare_for_fsdp(b) == names  # idempotent
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert qat_modules(a) == qat_modules(b)
    ids = torch.randint(0, 64, (2, 7))
    la, lb = a.loss(ids), b.loss(ids)
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for k in pa:
        assert torch.allclose(pa[k].grad, pb[k].grad, rtol=0, atol=1e-7), k


def test_activation_checkpointing_single_process_same_gradients():
    import copy

    from torchao import quantize_

    from paretoq_ao import ParetoQQATConfig
    from paretoq_ao.distributed import apply_activation_checkpointing
    from conftest import _make_decoder

    a = _make_decoder()
    quantize_(a, ParetoQQATConfig(bits=2))
    b = copy.deepcopy(a)
    assert apply_activation_checkpointing(b) == 2
    assert sorted(a.state_dict()) == sorted(b.state_dict())
    calls = []
    b.blocks[0].norm1.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, 64, (2, 7))
    la, lb = a.loss(ids), b.loss(ids)
    la.backward()
    assert len(calls) == 1
    lb.backward()
    assert len(calls) == 2  # the block ran again in the backward pass (recomputation)
    assert torch.equal(la, lb)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for k in pa:
        assert torch.allclose(pa[k].grad, pb[k].grad, rtol=0, atol=1e-7), k
    with pytest.raises(ValueError, match="no repeated blocks"):
        apply_activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_sampler_shards_the_global_batch():
    from paretoq_ao.data import BlockSampler, PackedBlocks

    blocks = PackedBlocks(torch.arange(40 * 4), 4, source="t")
    one = BlockSampler(blocks, 6, seed=3)
    two = [BlockSampler(blocks, 6, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(9):  # crosses an epoch boundary (40 // 6 = 6 batches per epoch)
        assert torch.equal(one.next_batch(), torch.cat([s.next_batch() for s in two]))
    assert all(s.position == one.position for s in two)
    with pytest.raises(ValueError, match="not divisible by the world size 4"):
        BlockSampler(blocks, 6, rank=0, world_size=4)


# --------------------------------------------------------------------------- the recipe under torchrun

def test_two_ranks_match_one_and_resume_on_one_rank(oracle, two_rank_run, tmp_path):
    out = copy_run(two_rank_run["out"], tmp_path / "run")
    ckpt = rc.latest_checkpoint(out)
    assert os.path.basename(ckpt) == "checkpoint-00000002"
    assert sorted(os.listdir(ckpt)) == ["dcp", "model", rc.STATE_NAME]
    assert {f for f in os.listdir(os.path.join(ckpt, "dcp")) if f.endswith(".distcp")} == {"__0_0.distcp",
                                                                                             "__1_0.distcp"}
    got = losses(out)
    for step in (1, 2, 3, 4):  # rank 0 logged step 4 before its checkpoint failed to save
        assert abs(got[step] - oracle["losses"][step]) < TOL
    # resume with ONE process (DCP reshards); finishes the run exactly as the oracle did
    res = rc.run_qat(recipe(out))
    assert res.resumed_from == 2 and res.steps == STEPS and len(res.losses) == 2
    for step, loss in zip((3, 4), res.losses):
        assert abs(loss - oracle["losses"][step]) < TOL
    assert max_diff(final_state(out), oracle["state"]) < TOL


def test_one_rank_checkpoint_resumes_on_two_ranks_then_converts(oracle, tmp_path):
    out = tmp_path / "run"
    rc.run_qat(recipe(out, stop_after=2))  # single process, safetensors checkpoint
    assert os.path.isfile(os.path.join(rc.latest_checkpoint(out), "model", "model.safetensors"))
    # with activation checkpointing (recomputation does not change the results)
    code, log = torchrun(COMMON + ["--output-dir", str(out), "--activation-checkpointing"])
    assert code == 0, log
    assert "on 2 ranks: step 4/4 (resumed at step 2)" in log
    ckpt = rc.latest_checkpoint(out)
    assert os.path.isdir(os.path.join(ckpt, "dcp"))
    for step in (3, 4):
        assert abs(losses(out)[step] - oracle["losses"][step]) < TOL
    assert max_diff(final_state(out), oracle["state"]) < TOL
    # a sharded checkpoint converts directly to packed weights
    from paretoq_ao.hf import load_model
    from paretoq_ao.packed import ParetoQPackedTensor

    rc.convert_checkpoint(out, tmp_path / "packed")
    packed, _ = load_model(tmp_path / "packed")
    assert isinstance(packed.model.layers[0].mlp.up_proj.weight, ParetoQPackedTensor)


def test_batch_not_divisible_by_world_size(fsdp_report):
    rep, out = fsdp_report  # `paretoq qat --batch-size 3` on 2 ranks (tests/_fsdp_worker.py)
    assert rep["cli"]["code"] != 0
    assert "batch_size 3 (the global batch) is not divisible by the world size 2" in rep["cli"]["stderr"]
    assert not os.path.exists(out / "latest")


def test_checkpoint_from_other_bits_is_refused(two_rank_run, tmp_path):
    out = copy_run(two_rank_run["out"], tmp_path / "run")
    args = list(COMMON)
    args[args.index("--bits") + 1] = "3"
    code, log = torchrun(args + ["--output-dir", str(out)])
    assert code != 0
    assert "was made with other settings" in log and "bits=2 (this run: 3)" in log
    assert os.path.basename(rc.latest_checkpoint(out)) == "checkpoint-00000002"


def test_rank_dying_mid_run_stops_the_job_and_last_checkpoint_resumes(oracle, two_rank_run, tmp_path):
    out = copy_run(two_rank_run["out"], tmp_path / "run")  # at step 2; rank 1 dies in its 2nd step (step 4)
    code, log = torchrun(COMMON + ["--output-dir", str(out)], script=FAULT_WORKER,
                         env={"PARETOQ_TEST_FAULT": "step:1:2"})
    assert code != 0
    assert "exitcode  : 3" in log and "rank      : 1" in log, log[-3000:]
    assert os.path.basename(rc.latest_checkpoint(out)) == "checkpoint-00000002"
    res = rc.run_qat(recipe(out))  # the last complete checkpoint resumes (here on one process)
    assert res.resumed_from == 2
    assert max_diff(final_state(out), oracle["state"]) < TOL


def test_crash_mid_save_keeps_previous_checkpoint(oracle, two_rank_run, tmp_path):
    out = copy_run(two_rank_run["out"], tmp_path / "run")  # rank 1 dies inside the save of step 4
    code, log = torchrun(COMMON + ["--output-dir", str(out)], script=FAULT_WORKER,
                         env={"PARETOQ_TEST_FAULT": "save:1:1"})
    assert code != 0
    assert "exitcode  : 4" in log, log[-3000:]
    assert os.path.basename(rc.latest_checkpoint(out)) == "checkpoint-00000002"
    assert not os.path.exists(os.path.join(out, "checkpoint-00000004"))
    code, log = torchrun(COMMON + ["--output-dir", str(out)])  # resume on 2 ranks, over the torn attempt
    assert code == 0, log
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))
    assert max_diff(final_state(out), oracle["state"]) < TOL


def test_disk_full_on_one_rank_fails_cleanly_on_all(two_rank_run):
    out, code, log = two_rank_run["out"], two_rank_run["code"], two_rank_run["log"]  # full at step 4's save
    assert code != 0
    for rank in (0, 1):  # every rank stops with the same clear message (no hang, no traceback soup)
        assert f"paretoq qat: error (rank {rank}): could not save the checkpoint of step 4" in log, log[-3000:]
    assert "is intact" in log
    assert os.path.basename(rc.latest_checkpoint(out)) == "checkpoint-00000002"
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))


def test_compiled_two_ranks_match_one(oracle, fresh_jobs):
    """torch.compile over the FSDP2-sharded QAT model: the same losses as eager on one process."""
    job, out = fresh_jobs["compiled"]  # `--compile --stop-after 2` on 2 ranks, started by fresh_jobs
    code, log = job.wait()
    assert code == 0, log
    got = losses(out)
    for step in (1, 2):
        assert abs(got[step] - oracle["losses"][step]) < TOL


def test_hung_rank_fails_the_job_after_the_timeout(two_rank_run, tmp_path):
    for job in Job.started:  # no job in the background competes for the CPU with the 5 s timeout
        job.wait()
    out = copy_run(two_rank_run["out"], tmp_path / "run")  # rank 1 hangs in step 3; rank 0 gives up after 5 s
    code, log = torchrun(COMMON + ["--output-dir", str(out), "--dist-timeout", "5"],
                         script=FAULT_WORKER, env={"PARETOQ_TEST_FAULT": "hang:1:1"})
    assert code != 0
    assert "paretoq qat: error (rank 0): rank 0 lost contact with the other ranks in step 3" in log, log[-3000:]
    assert "checkpoint-00000002" in log
    assert os.path.basename(rc.latest_checkpoint(out)) == "checkpoint-00000002"


def test_prepare_for_fsdp_refuses_what_it_cannot_shard():
    from torchao import quantize_

    from paretoq_ao import ParetoQQATConfig
    from paretoq_ao.distributed import prepare_for_fsdp, shard_model

    class MyLinear(torch.nn.Linear):
        pass

    m = torch.nn.Sequential(torch.nn.Linear(8, 8), MyLinear(8, 8), torch.nn.Linear(8, 4))
    quantize_(m, ParetoQQATConfig(bits=2), filter_fn=lambda mod, fqn: fqn in ("0", "1"))
    with pytest.raises(ValueError, match=r"1: a MyLinear, not a plain nn.Linear"):
        prepare_for_fsdp(m)
    assert type(m[0]) is torch.nn.Linear  # nothing was changed before the error
    with pytest.raises(RuntimeError, match="no process group"):
        shard_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_distillation_two_ranks_match_one_and_resume(tmp_path):
    """The teacher sharded like the student: the same distillation losses on 2 ranks as on one, and
    the 2-rank checkpoint resumes on one process (the teacher digest matches)."""
    kw = dict(distill=True, distill_weight=0.5, distill_temperature=2.0)
    out = tmp_path / "two"
    job = Job(COMMON + ["--output-dir", str(out), "--stop-after", "2", "--distill", "--distill-weight", "0.5",
                        "--distill-temperature", "2"])
    try:
        one = rc.run_qat(recipe(tmp_path / "one", **kw))  # on one process, while the 2 ranks run
    finally:
        code, log = job.wait()
    assert code == 0, log
    got = losses(out)
    for step in (1, 2):
        assert abs(got[step] - one.losses[step - 1]) < TOL
    res = rc.run_qat(recipe(out, **kw))
    assert res.resumed_from == 2 and max(abs(a - b) for a, b in zip(res.losses, one.losses[2:])) < TOL
